"""Header and address rules both ways in share: the listener and sendmail's maildrop alike."""

from __future__ import annotations

import email.utils
import re
from datetime import UTC, datetime

# How much of a message is searched for its header block. Postfix treats what follows its
# header_size_limit (100 KiB) as body; 1 MiB leaves room for a long DKIM-signed header while a
# 25 MiB message with no blank line costs one bounded search, not a list of its lines.
HEADER_SCAN_LIMIT = 1 << 20

_HEADER_END = re.compile(rb"\r?\n\r?\n")
# A Date or Message-ID field at the start of a line (continuation lines start with a blank).
_NAMES = re.compile(rb"^(date|message-id)[ \t]*:", re.IGNORECASE | re.MULTILINE)
# C0, DEL, C1, and lone surrogates: bytes that were not UTF-8, decoded with surrogateescape.
_UNSENDABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def missing_headers(data: bytes | bytearray, msg_id: str, hostname: str, now: float) -> bytes:
    """The Date and Message-ID lines to put before data, as Postfix adds for local mail.

    b"" when the header block has both. Only the first HEADER_SCAN_LIMIT bytes are searched
    and nothing is copied: the regexes run over data itself.
    """
    end = _HEADER_END.search(data, 0, HEADER_SCAN_LIMIT)
    stop = end.start() if end else min(len(data), HEADER_SCAN_LIMIT)
    found = {m.group(1).lower() for m in _NAMES.finditer(data, 0, stop)}
    extra = b""
    if b"date" not in found:
        # RFC 5322 §3.3: +0000 is UTC; -0000 would say the zone is unknown.
        stamp = email.utils.format_datetime(datetime.fromtimestamp(now, UTC))
        extra += b"Date: " + stamp.encode() + b"\r\n"
    if b"message-id" not in found:
        extra += b"Message-ID: <" + msg_id.encode() + b"@" + hostname.encode() + b">\r\n"
    return extra


def unsendable(address: str) -> bool:
    """Whether an envelope address holds what no provider session can carry: a control
    character (C0, DEL, C1) or bytes that were not UTF-8 (decoded with surrogateescape)."""
    return _UNSENDABLE.search(address) is not None
