"""The header From of a message: read it, and rewrite it to the account (from_policy: rewrite).

Providers refuse a From that is not the account or a verified alias. Rewriting keeps the
display name ("Billing <billing@shop.example>" becomes "Billing <account@gmail.com>") and,
when the message has no Reply-To, puts the original From there, so replies still reach the
sender. A message carrying a DKIM-Signature is left alone unless asked for: rewriting a signed
header breaks the signature, and a broken signature is worse than a refused From.
Only the header block is touched; the body is never parsed.
"""

from __future__ import annotations

import email.utils
import re

_HEADER_END = re.compile(rb"\r?\n\r?\n")


def _head(data: bytes) -> bytes:
    """The header block, its last field's line end included."""
    match = _HEADER_END.search(data)
    if match is None:
        return data
    return data[: match.start() + (2 if match.group().startswith(b"\r") else 1)]


def _field(head: bytes, name: bytes) -> tuple[int, int] | None:
    """(start, end) of the first `name:` field, folded lines included, end after its EOL."""
    pattern = re.compile(rb"(?:\A|\n)(" + re.escape(name) + rb"[ \t]*:)", re.IGNORECASE)
    match = pattern.search(head)
    if match is None:
        return None
    start = match.start(1)
    end = start
    while True:
        eol = head.find(b"\n", end)
        if eol < 0:
            return start, len(head)
        end = eol + 1
        if head[end : end + 1] not in (b" ", b"\t"):
            return start, end


def _value(head: bytes, span: tuple[int, int]) -> str:
    raw = head[span[0] : span[1]].split(b":", 1)[1]
    text = raw.decode("utf-8", "surrogateescape")
    return " ".join(text.split())  # unfold (RFC 5322 §2.2.3)


def header_from(data: bytes) -> str:
    """The address of the first From field, "" when there is none or it has no address."""
    head = _head(data)
    span = _field(head, b"from")
    if span is None:
        return ""
    _, addr = email.utils.parseaddr(_value(head, span))
    return addr


def signed(data: bytes) -> bool:
    """Whether the header block carries a DKIM-Signature field."""
    return _field(_head(data), b"dkim-signature") is not None


def rewrite_from(data: bytes, account: str) -> tuple[bytes, str]:
    """The message with its From set to account (display name kept) and the original From.

    The original From value goes into Reply-To when the message has none. Without a From
    field, one is added. Returns (message, original From value, "" when there was none).
    """
    head = _head(data)
    eol = b"\r\n" if b"\r\n" in head or not head else b"\n"
    span = _field(head, b"from")
    original = _value(head, span) if span else ""
    name, _ = email.utils.parseaddr(original) if original else ("", "")
    new = b"From: " + email.utils.formataddr((name, account), "utf-8").encode() + eol
    if original and _field(head, b"reply-to") is None:
        new += b"Reply-To: " + original.encode("utf-8", "surrogateescape") + eol
    if span is None:
        return new + data, original
    return data[: span[0]] + new + data[span[1] :], original
