"""The SMTP listener (aiosmtpd on the daemon's own loop): accept, spool durably, then 250.

The only promise made here: a 250 after DATA is sent after spool.put() returned, which is after
the message and its envelope were fsynced (RFC 5321 §6.1). Anything that goes wrong before that
is a 4xx, never a 250 and never aiosmtpd's default "500 Error: (Type) text".
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable
from typing import Any

import structlog
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from relayd import auth, metrics
from relayd.aiosmtpd_fence import HookDir, Protocol
from relayd.config import ListenConfig, is_loopback
from relayd.errors import SpoolError
from relayd.message import add_missing_headers
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


class Handler(HookDir):
    """aiosmtpd hooks: who may submit, how many recipients, and the spool write."""

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
