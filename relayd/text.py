"""Text from strangers, made safe to show: the one place control characters are neutralised.

Envelope addresses, subjects, login names and provider replies come from people relayd does not
know. A terminal acts on control characters: ESC[2J clears the screen, ESC]0;…BEL retitles the
window, the one-character C1 CSI (U+009B) does what ESC[ does, and a newline can forge a log
line. Every human-facing output (the CLI's lines, the console log) passes through printable().
"""

from __future__ import annotations

import re

# C0 (newline and tab included: a caller's own line breaks are not in the strings it passes),
# DEL, C1, and lone surrogates: bytes that were not UTF-8, decoded with surrogateescape.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    if char in _SHORT:
        return _SHORT[char]
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: show the original byte
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """text with every control character shown as an escape (ESC as \\x1b); nothing dropped."""
    if text.isascii() and text.isprintable():
        return text  # the common case, in C
    return _UNSAFE.sub(_escape, text)


def printable_lines(text: str) -> str:
    """printable() per line: for multi-line text whose line breaks are its own (tracebacks)."""
    return "\n".join(printable(line) for line in text.split("\n"))
