"""The SMTP listener (aiosmtpd on the daemon's own loop): accept, spool durably, then 250.

The only promise made here: a 250 after DATA is sent after spool.put() returned, which is after
the message and its envelope were fsynced (RFC 5321 §6.1). Anything that goes wrong before that
is a 4xx, never a 250 and never aiosmtpd's default "500 Error: (Type) text".
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import re
import time
from collections.abc import Callable
from typing import Any

import structlog
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, LoginPassword, Session, syntax

from relayd import auth, metrics
from relayd.config import ListenConfig, is_loopback
from relayd.errors import SpoolError
from relayd.spool import Envelope as Queued
from relayd.spool import Spool, is_enospc

log = structlog.get_logger()

R_OK = "250 2.0.0 Ok: queued as {id}"
R_SPOOL_FAILED = "451 4.3.0 Requested action aborted: local error in processing"
R_DISK_FULL = "452 4.3.1 Insufficient system storage"
R_TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
R_RELAY_DENIED = "550 5.7.1 Relaying denied: {ip} may not submit here"
R_AUTH_REQUIRED = "530 5.7.0 Authentication required"
R_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
R_SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_REST = re.compile(r" [^\s(]")  # one space, then parameters (no comment, no CFWS)
_PLAIN_ADDR = re.compile(rf"<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>")
LINE_LIMIT = 65_536  # bytes per line of DATA, CRLF included
# A line (with its CR) over the limit; anchored at line starts so the scan stays linear.
_LONG_LINE = re.compile(rb"(?:\A|\n)[^\n]{%d}" % LINE_LIMIT)


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


_NAMES: dict[tuple[type, tuple[str, ...]], list[str]] = {}


def _method_names(cls: type, prefixes: tuple[str, ...]) -> list[str]:
    """The attribute names of cls that start with one of prefixes (cached per class)."""
    key = (cls, prefixes)
    if key not in _NAMES:
        _NAMES[key] = sorted(n for n in dir(cls) if n.startswith(prefixes))
    return _NAMES[key]


class Handler:
    """aiosmtpd hooks: who may submit, how many recipients, and the spool write."""

    def __dir__(self) -> list[str]:
        # aiosmtpd looks the hooks up with dir()/getmembers() per connection (see _Session).
        return _method_names(type(self), ("handle_", "auth_"))

    def __init__(
        self,
        cfg: ListenConfig,
        spool: Spool,
        on_accepted: Callable[[Queued], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.spool = spool
        self.on_accepted = on_accepted
        self.clock = clock
        self.networks = [ipaddress.ip_network(n, strict=False) for n in cfg.allowed_networks]
        self.inflight: set[asyncio.Future[str]] = set()
        self.users = auth.load_users(cfg.users_file) if cfg.users_file else None

    def allowed(self, peer: Any) -> bool:
        if not isinstance(peer, tuple) or not peer:
            return True  # a UNIX socket or unknown peer: only local processes can get here
        try:
            ip = ipaddress.ip_address(peer[0])
        except ValueError:
            return False
        if ip.is_loopback or is_loopback(str(getattr(ip, "ipv4_mapped", None) or ip)):
            return True
        return any(ip in net for net in self.networks)

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        # aiosmtpd reads commands one by one from a buffered stream, so pipelined
        # commands already work; RFC 2920 only asks that we say so.
        lines = [*responses[:-1], "250-PIPELINING", responses[-1]]
        # aiosmtpd would push each line with its own write: six send() calls per client.
        # One write carries the whole reply; an empty list tells aiosmtpd it was sent.
        await server.push("\r\n".join(lines))
        return []

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if not self.allowed(session.peer) and not session.authenticated:
            ip = _peer(session).rsplit(":", 1)[0]
            log.warning("client.refused", peer=ip, command="MAIL", auth_offered=bool(self.users))
            metrics.REJECTED.labels(reason="access").inc()
            return R_AUTH_REQUIRED if self.users else R_RELAY_DENIED.format(ip=ip)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        """aiosmtpd's authenticator: PLAIN/LOGIN against the users file; never logs secrets."""
        if self.users is None or not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        name = data.login.decode("utf-8", "replace")
        ip = _peer(session).rsplit(":", 1)[0]
        if self.users.verify(name, data.password.decode("utf-8", "surrogateescape")):
            log.info("client.authenticated", peer=ip, user=name, mechanism=mechanism)
            return AuthResult(success=True, auth_data=name)
        log.warning("client.auth_failed", peer=ip, user=name, mechanism=mechanism)
        metrics.REJECTED.labels(reason="auth").inc()
        return AuthResult(success=False, handled=False)

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= self.cfg.max_recipients:
            return R_TOO_MANY_RCPTS
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        # A client that disconnects cancels this coroutine; the shielded write still ends
        # with the message either fully spooled (and handed to the relay) or not at all.
        future = asyncio.ensure_future(self._store(session, envelope))
        self.inflight.add(future)
        future.add_done_callback(self.inflight.discard)
        return await asyncio.shield(future)

    async def _store(self, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content
        data: bytes | bytearray = (
            raw
            if isinstance(raw, bytes | bytearray)
            else str(raw or "").encode("utf-8", "surrogateescape")
        )
        if len(data) > self.cfg.max_message_size:
            return R_TOO_BIG
        now = self.clock()
        msg_id = self.spool.new_id()
        data = add_missing_headers(data, msg_id, self.cfg.hostname, now)
        try:
            env = await asyncio.to_thread(
                self.spool.put,
                envelope.mail_from or "",
                list(envelope.rcpt_tos),
                data,
                now,
                msg_id,
            )
        except (SpoolError, OSError) as exc:
            log.error("message.spool_failed", error=str(exc), peer=_peer(session))
            metrics.REJECTED.labels(reason="spool").inc()
            return R_DISK_FULL if is_enospc(exc) else R_SPOOL_FAILED
        metrics.ACCEPTED.inc()
        log.info(
            "message.accepted",
            msg_id=env.id,
            mail_from=env.mail_from,
            recipients=len(env.rcpt_to),
            size=env.size,
            peer=_peer(session),
        )
        self.on_accepted(env)
        return R_OK.format(id=env.id)

    async def handle_exception(self, error: Exception) -> str:
        log.error("session.error", error=type(error).__name__)
        return "421 4.3.0 Local error, closing connection"


def _peer(session: Session) -> str:
    peer = session.peer
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)


class Listener:
    """The listening socket and its sessions; start() binds, stop() drains then closes."""

    def __init__(self, cfg: ListenConfig, handler: Handler) -> None:
        self.cfg = cfg
        self.handler = handler
        self.sessions: set[SMTP] = set()
        self.server: asyncio.base_events.Server | None = None

    def _protocol(self) -> SMTP:
        proto = _Session(
            self.handler,
            hostname=self.cfg.hostname,
            ident="relayd",
            data_size_limit=self.cfg.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=self.cfg.timeout,
            # Offered only with a users file; plaintext by design (see config.validate).
            authenticator=self.handler.authenticate if self.handler.users else None,
            auth_require_tls=not self.handler.users,
        )
        proto.registry = self.sessions
        return proto

    async def start(self) -> tuple[str, int]:
        """Bind and listen; returns the bound (host, port), which matters when port is 0."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            self._protocol,
            host=self.cfg.host,
            port=self.cfg.port,
            reuse_address=True,
        )
        sockname = self.server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    async def stop(self, deadline: float) -> None:
        """Stop accepting; let DATA phases finish until the deadline; then close every session."""
        if self.server is not None:
            self.server.close()
        if self.handler.inflight:
            await asyncio.wait(set(self.handler.inflight), timeout=deadline)
        for proto in list(self.sessions):
            transport = proto.transport
            if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
                transport.write(R_SHUTTING_DOWN.encode() + b"\r\n")
                transport.close()


R_LINE_TOO_LONG = "500 5.5.6 Line too long (see RFC 5321 4.5.3.1.6)"
R_DATA_TOO_BIG = "552 5.3.4 Too much mail data"


async def read_data(
    reader: asyncio.StreamReader, size_limit: int | None
) -> tuple[bytes | bytearray, str]:
    """Read DATA up to the line ".", un-stuff it; (message, "") or (b"", error reply).

    aiosmtpd reads DATA one line per await (~1,300 for a 100 KiB message, the listener's
    largest cost there); this reads up to each ".<CRLF>", or a buffer's worth, at once and
    checks whether that dot starts a line. The end is still exactly a line "." after CRLF
    (RFC 5321 §4.1.1.4): a bare LF or CR before the dot never ends the message, so smuggled
    "<LF>.<LF>" stays data (CVE-2024-27305). Bytes after the end (pipelined commands) stay
    in the reader. Over the size limit it reads on to the end and keeps nothing.
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
    if _LONG_LINE.search(buf):
        return b"", R_LINE_TOO_LONG
    if buf[:1] == b".":
        del buf[0]
    if b"\r\n." in buf:
        buf = bytearray(buf.replace(b"\r\n.", b"\r\n"))
    if size_limit and len(buf) > size_limit:
        return b"", R_DATA_TOO_BIG
    return buf, ""  # no bytes() copy: for a 25 MiB message that copy doubled the peak


class _Session(SMTP):
    registry: set[SMTP]
    # aiosmtpd answers "500 Line too long" past RFC 5321's 1,000 octets (§4.5.3.1.6), but
    # apps emit minified HTML and long base64-less lines; Postfix accepts them, and so does
    # relayd, byte for byte, up to 64 KiB a line (which also caps a session's read buffer).
    # Command lines stay limited by aiosmtpd's command_size_limit.
    line_length_limit = LINE_LIMIT

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.registry.add(self)
        super().connection_made(transport)

    def __dir__(self) -> list[str]:
        # aiosmtpd's __init__ runs dir() and inspect.getmembers() over the whole session on
        # every connection, only to find its smtp_* and auth_* methods: ~20 % of the
        # listener's CPU per message. Those names are the same for every session.
        return _method_names(type(self), ("smtp_", "auth_"))

    # aiosmtpd calls the authenticator synchronously, and one scrypt check costs ~50 ms: a
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
        # aiosmtpd runs every MAIL/RCPT argument through the RFC 5322 header parser and
        # builds a class per call: ~70 µs, twice per message. A plain <dot-atom@domain>
        # parses to itself, so it skips that; anything else still gets aiosmtpd's parser.
        match = _PLAIN_ADDR.match(arg)
        rest = arg[match.end() :] if match else ""
        if match is None or (rest and not _PLAIN_REST.match(rest)):
            return super()._getaddr(arg)
        local = match.group(1).rpartition("@")[0]
        if self.local_part_limit and len(local) > self.local_part_limit:
            return None, None
        return match.group(1), rest[1:]
