"""The SMTP listener (aiosmtpd on the daemon's own loop): accept, spool durably, then 250.

The only promise made here: a 250 after DATA is sent after spool.put() returned, which is after
the message and its envelope were fsynced (RFC 5321 §6.1). Anything that goes wrong before that
is a 4xx, never a 250 and never aiosmtpd's default "500 Error: (Type) text".
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import resource
import socket
import time
import weakref
from collections.abc import Callable
from typing import Any, cast

import structlog
from aiosmtpd.smtp import SMTP, Envelope, Session

from relayd import auth, metrics, routes
from relayd.access import Access, peer_address
from relayd.aiosmtpd_fence import HookDir, Protocol
from relayd.config import ListenConfig
from relayd.errors import SpoolError
from relayd.logs import Throttle
from relayd.message import missing_headers, unsendable
from relayd.spool import Envelope as Queued
from relayd.spool import Spool, is_enospc

log = structlog.get_logger()

R_OK = "250 2.0.0 Ok: queued as {id}"
R_SPOOL_FAILED = "451 4.3.0 Requested action aborted: local error in processing"
R_DISK_FULL = "452 4.3.1 Insufficient system storage"
R_TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
R_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
R_SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
R_TOO_MANY_SESSIONS = "421 4.7.0 Too many connections, try again later"
# RFC 3463: X.1.7 bad sender's and X.1.3 bad destination mailbox address syntax. A control
# character or non-UTF-8 bytes could never be given to the provider: refused here, not spooled.
R_BAD_SENDER = "501 5.1.7 Bad sender address syntax: control character or invalid UTF-8"
R_BAD_RCPT = "553 5.1.3 Bad recipient address syntax: control character or invalid UTF-8"

# Commands one session may send (aiosmtpd's command_call_limit; one more gets 421 4.7.0 and
# the connection is closed). listen.timeout bounds a session's silences; this bounds its
# length, so a client sending NOOPs for ever cannot keep one of max_sessions' slots.
SESSION_MESSAGES = 1000
AUTH_ATTEMPTS = 20


def command_limits(max_recipients: int) -> dict[str, int]:
    """Per-command counts one session may use: SESSION_MESSAGES transactions' worth."""
    return {
        "*": SESSION_MESSAGES,
        "RCPT": SESSION_MESSAGES * max_recipients,
        "AUTH": AUTH_ATTEMPTS,
    }


class Handler(Access, HookDir):
    """aiosmtpd hooks: who may submit, how many recipients, and the spool write."""

    def __init__(
        self,
        cfg: ListenConfig,
        spool: Spool,
        on_accepted: Callable[[Queued], None],
        clock: Callable[[], float] = time.time,
        router: routes.Table | None = None,
    ) -> None:
        self.cfg = cfg
        # Which senders some route can take (replaced on reload); None takes every sender.
        self.router = router if router is not None and not router.takes_everyone else None
        self.spool = spool
        self.on_accepted = on_accepted
        self.clock = clock
        self.networks = [ipaddress.ip_network(n, strict=False) for n in cfg.allowed_networks]
        self.inflight: set[asyncio.Future[str]] = set()
        self.users = auth.load_users(cfg.users_file) if cfg.users_file else None

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
        # One write for the whole reply (docs/benchmarks.md#ehlo-in-one-write); an empty
        # list tells aiosmtpd it was sent.
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
            return self._refused_access(session)
        if unsendable(address):
            metrics.REJECTED.labels(reason="address").inc()
            return R_BAD_SENDER
        refusal = self.router.refusal_at_mail(address) if self.router else ""
        if refusal:
            return self._unroutable(session, "MAIL", refusal)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

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
        if unsendable(address):
            metrics.REJECTED.labels(reason="address").inc()
            return R_BAD_RCPT
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
        refusal = await self._header_route_refusal(envelope.mail_from or "", data)
        if refusal:
            return self._unroutable(session, "DATA", refusal)
        now = self.clock()
        msg_id = self.spool.new_id()
        try:
            env = await asyncio.to_thread(
                self._put,
                envelope.mail_from or "",
                list(envelope.rcpt_tos),
                data,
                now,
                msg_id,
            )
        except (SpoolError, OSError) as exc:
            log.error("message.spool_failed", error=str(exc), peer=peer_address(session))
            metrics.REJECTED.labels(reason="spool").inc()
            return R_DISK_FULL if is_enospc(exc) else R_SPOOL_FAILED
        metrics.ACCEPTED.inc()
        log.info(
            "message.accepted",
            msg_id=env.id,
            mail_from=env.mail_from,
            recipients=len(env.rcpt_to),
            size=env.size,
            peer=peer_address(session),
        )
        self.on_accepted(env)
        return R_OK.format(id=env.id)

    def _put(
        self, mail_from: str, rcpt_to: list[str], data: bytes | bytearray, now: float, msg_id: str
    ) -> Queued:
        """In a thread: the header scan and the fsynced write, both off the event loop."""
        head = missing_headers(data, msg_id, self.cfg.hostname, now)
        return self.spool.put(mail_from, rcpt_to, data, now, msg_id, head)

    async def handle_exception(self, error: Exception) -> str:
        log.error("session.error", error=type(error).__name__)
        return "421 4.3.0 Local error, closing connection"


class Listener:
    """The listening socket and its sessions; start() binds, stop() drains then closes."""

    def __init__(self, cfg: ListenConfig, handler: Handler) -> None:
        self.cfg = cfg
        self.handler = handler
        # Weak: a session whose connection never came up (transport creation failed after
        # the factory ran) must not hold a max_sessions slot for ever.
        self.sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()
        self.server: asyncio.base_events.Server | None = None
        self.busy = Throttle(10.0)
        self.accept_errors = Throttle(10.0)

    def _protocol(self) -> asyncio.Protocol:
        if len(self.sessions) >= self.cfg.max_sessions:
            return _Busy(self._refused)
        proto = Protocol(
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
            command_call_limit=command_limits(self.cfg.max_recipients),
        )
        proto.registry = self.sessions
        # Counted now, not at connection_made: one accept loop may create several sessions
        # before the first of them is connected.
        self.sessions.add(proto)
        return proto

    def _refused(self) -> None:
        metrics.REJECTED.labels(reason="busy").inc()
        suppressed = self.busy.hit()
        if suppressed is not None:  # one line per interval, not one per connection
            log.warning(
                "client.refused_busy",
                max_sessions=self.cfg.max_sessions,
                refused=suppressed + 1,
                detail="listen.max_sessions reached; answered 421 4.7.0",
            )

    async def start(self) -> tuple[str, int]:
        """Bind and listen; returns the bound (host, port), which matters when port is 0."""
        loop = asyncio.get_running_loop()
        _check_descriptors(self.cfg.max_sessions)
        previous = loop.get_exception_handler()

        def on_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            if self._accept_failed(context.get("exception")):
                return
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(on_loop_error)
        if _any_ipv6(self.cfg.host):
            self.server = await loop.create_server(self._protocol, sock=_dual_stack(self.cfg.port))
        else:
            self.server = await loop.create_server(
                self._protocol, host=self.cfg.host, port=self.cfg.port, reuse_address=True
            )
        sockname = self.server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    def _accept_failed(self, exc: object) -> bool:
        """Whether exc is accept() out of descriptors or memory; if so, logged (throttled).

        asyncio reports each such accept() with a traceback and tries again a second later:
        thousands of lines a minute while the process is out of descriptors.
        """
        if not (isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRORS):
            return False
        suppressed = self.accept_errors.hit()
        if suppressed is not None:
            log.error(
                "server.accept_failed",
                error=exc.strerror,
                failed=suppressed + 1,
                detail="new connections wait; raise LimitNOFILE= or lower listen.max_sessions",
            )
        return True

    async def stop(self, deadline: float) -> None:
        """Stop accepting; let DATA phases finish until the deadline; then close every session."""
        if self.server is not None:
            self.server.close()
        if self.handler.inflight:
            await asyncio.wait(set(self.handler.inflight), timeout=deadline)
        for proto in list(self.sessions):
            # Not isinstance(…, WriteTransport): uvloop's transports are no subclass of it,
            # so under uvloop no session was told or closed.
            transport = cast(asyncio.WriteTransport | None, proto.transport)
            if transport is not None and not transport.is_closing():
                transport.write(R_SHUTTING_DOWN.encode() + b"\r\n")
                transport.close()


class _Busy(asyncio.Protocol):
    """A connection beyond listen.max_sessions: one 421 line, then closed (RFC 5321 §3.8).

    No aiosmtpd session is built for it: refusing costs one descriptor for a moment.
    """

    def __init__(self, on_refused: Callable[[], None]) -> None:
        self.on_refused = on_refused

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports do not subclass asyncio's.
        cast(asyncio.WriteTransport, transport).write(R_TOO_MANY_SESSIONS.encode() + b"\r\n")
        transport.close()
        self.on_refused()


_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# Descriptors the daemon needs besides one per session: spool, pipes, upstream, metrics.
FD_RESERVE = 64


def _check_descriptors(max_sessions: int) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and max_sessions + FD_RESERVE > soft:
        log.warning(
            "server.fd_limit_exceeded",
            max_sessions=max_sessions,
            limit=soft,
            detail=f"sessions may run out of descriptors: keep listen.max_sessions under "
            f"the limit minus {FD_RESERVE} (systemd: LimitNOFILE=)",
        )


def _any_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host) == ipaddress.IPv6Address("::")
    except ValueError:
        return False


def _dual_stack(port: int) -> socket.socket:
    """One socket on [::]:port that takes IPv4 clients too (as ::ffff:a.b.c.d).

    asyncio's create_server sets IPV6_V6ONLY on every IPv6 socket it binds, which made
    listen.host "::" IPv6 only; this one is bound by hand with the option off.
    """
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
    except OSError:
        sock.close()
        raise
    return sock
