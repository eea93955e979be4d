"""Header helpers both ways in share: the listener and sendmail's maildrop add them alike."""

from __future__ import annotations

import email.utils
import re

_HEADER_END = re.compile(rb"\r?\n\r?\n")


def add_missing_headers(
    data: bytes | bytearray, msg_id: str, hostname: str, now: float
) -> bytes | bytearray:
    """Prepend Date and Message-ID when the header block lacks them, as Postfix does locally."""
    match = _HEADER_END.search(data)
    head = bytes(data[: match.start()] if match else data)  # the header block only
    names = {
        line.split(b":", 1)[0].strip().lower()
        for line in head.split(b"\n")
        if line[:1] not in (b" ", b"\t") and b":" in line
    }
    extra = b""
    if b"date" not in names:
        extra += b"Date: " + email.utils.formatdate(now).encode() + b"\r\n"
    if b"message-id" not in names:
        extra += b"Message-ID: <" + msg_id.encode() + b"@" + hostname.encode() + b">\r\n"
    if not extra:
        return data
    if isinstance(data, bytearray):
        data[0:0] = extra  # in place: a large message is not copied a second time
        return data
    return extra + data
