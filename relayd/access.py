"""Who may submit to the listener, and which senders some route takes.

A peer submits without AUTH from loopback or inside listen.allowed_networks; anyone else needs
a user of the users file (PLAIN/LOGIN, never logged). With routes, a sender no route takes is
refused at MAIL (or at DATA, for routes on the header From): while the client can still tell
its user, never a bounce later. A mixin of server.Handler, which sets these.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import structlog
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from relayd import auth, metrics, rewrite, routes

log = structlog.get_logger()

R_RELAY_DENIED = "550 5.7.1 Relaying denied: {ip} may not submit here"
R_AUTH_REQUIRED = "530 5.7.0 Authentication required"
HEADER_SCAN = 256 * 1024  # bytes of a message searched for its From (routes on header From)
R_NO_ROUTE = "550 5.7.1 Sender not accepted here: {reason}"


class Access:
    """The access side of server.Handler (a mixin: Handler sets these)."""

    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
    users: auth.Users | None
    router: routes.Table | None

    def _refused_access(self, session: Session) -> str:
        """The reply to MAIL from a peer that may not submit without AUTH, logged, counted."""
        ip = peer_address(session).rsplit(":", 1)[0]
        log.warning("client.refused", peer=ip, command="MAIL", auth_offered=bool(self.users))
        metrics.REJECTED.labels(reason="access").inc()
        return R_AUTH_REQUIRED if self.users else R_RELAY_DENIED.format(ip=ip)

    def allowed(self, peer: Any) -> bool:
        """Whether peer may submit without AUTH: loopback, or inside allowed_networks.

        On a dual-stack listener an IPv4 client is ::ffff:a.b.c.d and is matched as IPv4 too.
        Fails closed: a peer that is not an (address, port, ...) tuple is refused.
        """
        if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
            return False
        try:
            ip = ipaddress.ip_address(peer[0].partition("%")[0])  # no IPv6 scope id
        except ValueError:
            return False
        mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
        return any(
            address.is_loopback or any(address in net for net in self.networks)
            for address in ([ip, mapped] if mapped else [ip])
        )

    async def _header_route_refusal(self, sender: str, data: bytes | bytearray) -> str:
        """Why no route takes this message, for routes that match on the header From."""
        router = self.router
        if router is None or not router.uses_header_from:
            return ""
        # A header scan, like missing_headers in server.Handler._put: off the loop, bounded.
        header_from = await asyncio.to_thread(rewrite.header_from, bytes(data[:HEADER_SCAN]))
        return router.decide(sender, header_from).refusal

    def _unroutable(self, session: Session, command: str, refusal: str) -> str:
        # Refused now, while the client can still tell its user: never a bounce later.
        ip = peer_address(session).rsplit(":", 1)[0]
        log.warning("client.refused", peer=ip, command=command, reason=f"route: {refusal}")
        metrics.REJECTED.labels(reason="route").inc()
        return R_NO_ROUTE.format(reason=refusal)

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        """aiosmtpd's authenticator: PLAIN/LOGIN against the users file; never logs secrets."""
        if self.users is None or not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        name = data.login.decode("utf-8", "replace")
        ip = peer_address(session).rsplit(":", 1)[0]
        if self.users.verify(name, data.password.decode("utf-8", "surrogateescape")):
            log.info("client.authenticated", peer=ip, user=name, mechanism=mechanism)
            return AuthResult(success=True, auth_data=name)
        log.warning("client.auth_failed", peer=ip, user=name, mechanism=mechanism)
        metrics.REJECTED.labels(reason="auth").inc()
        return AuthResult(success=False, handled=False)


def peer_address(session: Session) -> str:
    peer = session.peer
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)
