"""Fence: every use relayd makes of aiosmtpd's private members, and its overrides of them.

aiosmtpd (>=1.4.6, <2) gives no public hook for what relayd changes here; each change is kept
here so that an aiosmtpd upgrade is checked in one place. The private members relied on are in
PRIVATE_MEMBERS (of aiosmtpd.smtp.SMTP):

- ``_reader``, ``_set_post_data_state``, ``_call_handler_hook``: smtp_DATA reads the body in bulk
  (read_data) and then runs aiosmtpd's own DATA hook and state reset.
- ``_getaddr``: a fast path for a plain ``<local@domain>`` in MAIL/RCPT.
- ``_authenticate``, ``_authenticator``: the users-file check runs in a thread, not on the loop.
- ``__dir__`` of the session and the handler: aiosmtpd looks hooks up with dir() per connection.

None has a public fallback (FALLBACKS is empty): `relayd serve` and `relayd check` refuse to
start when missing() names any (relayd.fences).
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import MutableSet
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, syntax

LIBRARY = "aiosmtpd"
PRIVATE_MEMBERS = {
    "aiosmtpd.smtp.SMTP": (
        "_reader",
        "_set_post_data_state",
        "_call_handler_hook",
        "_getaddr",
        "_authenticate",
        "_authenticator",
    ),
}

FALLBACKS: dict[str, str] = {}  # member -> what relayd does without it


async def missing() -> list[str]:
    """The PRIVATE_MEMBERS this aiosmtpd lacks, looked up on a connected session.

    Some are set only once a client is connected (``_reader``): the probe connects a session
    over a socketpair the way asyncio does (StreamReaderProtocol.connection_made, aiosmtpd's
    base) without starting aiosmtpd's dialogue, looks, and closes it.
    """
    loop = asyncio.get_running_loop()
    mail_log = logging.getLogger("mail.log")
    quiet, mail_log.disabled = mail_log.disabled, True  # its set-up lines are not a session's
    try:
        session = SMTP(object(), hostname="fence.probe", ident="relayd", loop=loop)
    finally:
        mail_log.disabled = quiet
    ours, theirs = socket.socketpair()
    try:
        transport, _ = await loop.connect_accepted_socket(lambda: _Probe(session), ours)
        transport.close()
    finally:
        theirs.close()
    names = PRIVATE_MEMBERS["aiosmtpd.smtp.SMTP"]
    return [f"SMTP.{name}" for name in names if not hasattr(session, name)]


class _Probe(asyncio.Protocol):
    """Connects an aiosmtpd session as asyncio would, but no client dialogue begins."""

    def __init__(self, session: SMTP) -> None:
        self.session = session

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        asyncio.StreamReaderProtocol.connection_made(self.session, transport)


_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_REST = re.compile(r" [^\s(]")  # one space, then parameters (no comment, no CFWS)
# An angle address holding a C0/DEL/C1 control character or a byte that was not UTF-8.
_UNSAFE_ADDR = re.compile("<([^<>]*[\x00-\x1f\x7f-\x9f\ud800-\udfff][^<>]*)>")
_PLAIN_ADDR = re.compile(rf"<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>")
LINE_LIMIT = 65_536  # bytes per line of DATA, CRLF included


def has_long_line(buf: bytes | bytearray, limit: int = LINE_LIMIT) -> bool:
    """Whether a line of buf, its LF included, is longer than limit bytes.

    A line that long holds a whole aligned block of limit // 2 bytes with no LF, so one
    memchr per block finds every candidate: ~800 calls for 25 MiB, where a regex tried a
    match at every line start (0.6 s of event loop for 25 MiB of 5-byte header lines).
    """
    half = max(limit // 2, 1)
    start = 0
    while start < len(buf):
        if buf.find(b"\n", start, start + half) >= 0:
            start += half
            continue
        first = buf.rfind(b"\n", 0, start) + 1
        end = buf.find(b"\n", start)
        end = len(buf) if end < 0 else end
        if end - first >= limit:  # bytes before the LF; with it, over the limit
            return True
        start = end + 1
    return False


_NAMES: dict[tuple[type, tuple[str, ...]], list[str]] = {}


def method_names(cls: type, prefixes: tuple[str, ...]) -> list[str]:
    """The attribute names of cls that start with one of prefixes (cached per class)."""
    key = (cls, prefixes)
    if key not in _NAMES:
        _NAMES[key] = sorted(n for n in dir(cls) if n.startswith(prefixes))
    return _NAMES[key]


class HookDir:
    """A handler whose hooks aiosmtpd finds without a dir() over the whole object per session."""

    def __dir__(self) -> list[str]:
        # Cached per class: see docs/benchmarks.md#session-set-up
        return method_names(type(self), ("handle_", "auth_"))


R_LINE_TOO_LONG = "500 5.5.6 Line too long (see RFC 5321 4.5.3.1.6)"
R_DATA_TOO_BIG = "552 5.3.4 Too much mail data"


async def read_data(
    reader: asyncio.StreamReader, size_limit: int | None
) -> tuple[bytes | bytearray, str]:
    """Read DATA up to the line ".", un-stuff it; (message, "") or (b"", error reply).

    Reads up to each ".<CRLF>" (or a buffer's worth) at once, not one line per await (see
    docs/benchmarks.md#bulk-data-reading), and checks whether that dot starts a line. The end
    is still exactly a line "." after CRLF (RFC 5321 §4.1.1.4): a bare LF or CR before the
    dot never ends the message, so smuggled "<LF>.<LF>" stays data (CVE-2024-27305). Bytes
    after the end (pipelined commands) stay in the reader. Over the size limit it reads on to
    the end and keeps nothing.
    """
    buf = bytearray()
    too_big = False
    while True:
        try:
            buf += await reader.readuntil(b".\r\n")
        except asyncio.LimitOverrunError as exc:
            buf += await reader.read(exc.consumed)
        else:
            dot = len(buf) - 3
            if dot == 0 or buf[dot - 2 : dot] == b"\r\n":
                del buf[dot:]
                break
        if size_limit and len(buf) > size_limit + 2:
            too_big = True
            del buf[:-2]  # the last two bytes tell whether a following dot starts a line
    if too_big:
        return b"", R_DATA_TOO_BIG
    if has_long_line(buf):
        return b"", R_LINE_TOO_LONG
    if buf[:1] == b".":
        del buf[0]
    if b"\r\n." in buf:
        buf = bytearray(buf.replace(b"\r\n.", b"\r\n"))
    if size_limit and len(buf) > size_limit:
        return b"", R_DATA_TOO_BIG
    return buf, ""  # no bytes() copy: docs/benchmarks.md#one-buffer-for-a-received-message


class Protocol(SMTP):
    """aiosmtpd's SMTP protocol with relayd's overrides; one per client connection."""

    registry: MutableSet[SMTP]
    # aiosmtpd answers "500 Line too long" past RFC 5321's 1,000 octets (§4.5.3.1.6), but
    # apps emit minified HTML and long base64-less lines; Postfix accepts them, and so does
    # relayd, byte for byte, up to 64 KiB a line (which also caps a session's read buffer).
    # Command lines stay limited by aiosmtpd's command_size_limit.
    line_length_limit = LINE_LIMIT

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.registry.add(self)
        super().connection_made(transport)

    def __dir__(self) -> list[str]:
        # The smtp_*/auth_* names are the same for every session: see
        # docs/benchmarks.md#session-set-up
        return method_names(type(self), ("smtp_", "auth_"))

    # aiosmtpd calls the authenticator synchronously, and one scrypt check takes tens of ms: a
    # client sending wrong passwords would stall every other session. The built-in PLAIN and
    # LOGIN parsers still run; the check they ask for is done in a thread instead.
    _auth_request: tuple[str, Any] | None = None

    def _authenticate(self, mechanism: str, auth_data: Any) -> AuthResult:
        self._auth_request = (mechanism, auth_data)
        return AuthResult(success=False, handled=False)  # replaced by _verified()

    async def _verified(self, parsed: AuthResult) -> AuthResult:
        request, self._auth_request = self._auth_request, None
        if request is None or self._authenticator is None:
            return parsed  # the parser already answered (bad base64, client gave up)
        assert self.session is not None and self.envelope is not None
        return await asyncio.to_thread(
            self._authenticator, self, self.session, self.envelope, *request
        )

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._verified(await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._verified(await super().auth_LOGIN(_, args))

    def connection_lost(self, exc: Exception | None) -> None:
        self.registry.discard(self)
        super().connection_lost(exc)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA with the body read in bulk (see read_data); same replies."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            body, problem = await read_data(self._reader, self.data_size_limit)
        except asyncio.IncompleteReadError:
            return  # the client went away mid-DATA: nothing was stored
        if problem:
            self._set_post_data_state()  # type: ignore[no-untyped-call]  # aiosmtpd, untyped
            await self.push(problem)
            return
        # A bytearray where aiosmtpd's stubs say bytes: only relayd's handler reads it.
        self.envelope.content = body  # type: ignore[assignment]
        self.envelope.original_content = body  # type: ignore[assignment]
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]  # aiosmtpd, untyped
        await self.push("250 OK" if status is MISSING else status)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # A plain <dot-atom@domain> parses to itself, so it skips aiosmtpd's costly RFC 5322
        # parser (docs/benchmarks.md#plain-addresses); anything else still goes through it.
        unsafe = _UNSAFE_ADDR.match(arg)
        if unsafe:
            # <…> with a control character: aiosmtpd's parser would give a bare "501 Syntax";
            # passed on, the handler refuses it with its enhanced code (501 5.1.7 / 553 5.1.3).
            return unsafe.group(1), arg[unsafe.end() :].strip()
        match = _PLAIN_ADDR.match(arg)
        rest = arg[match.end() :] if match else ""
        if match is None or (rest and not _PLAIN_REST.match(rest)):
            return super()._getaddr(arg)
        local = match.group(1).rpartition("@")[0]
        if self.local_part_limit and len(local) > self.local_part_limit:
            return None, None
        return match.group(1), rest[1:]
