"""One SMTP session with the provider, via aiosmtplib; the only module that talks to it.

Steps are explicit so every failure names where it happened (dns, connect, tls, ehlo, auth,
mail, rcpt, data). TLS is never opportunistic: ``implicit`` wraps the socket before the banner,
``starttls`` fails closed when the server does not offer it, ``none`` is plaintext by request.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import Any

import aiosmtplib
import structlog

from relayd import oauth, presets
from relayd.aiosmtplib_fence import hand_over
from relayd.config import UpstreamConfig
from relayd.errors import UpstreamError
from relayd.handshake import (
    StepTiming,
    auth_hint,
    connect_tcp,
    describe,
    refused,
    tls_context,
    tls_details,
    tls_hint,
)
from relayd.states import OutcomeStatus, SaslMechanism, TlsMode, UpstreamAuth
from relayd.transaction import Channel, Outcome, Result, Submission, status

__all__ = [
    "Outcome",
    "Result",
    "Session",
    "StepTiming",
    "Submission",
    "auth_hint",
    "tls_context",
    "tls_details",
    "tls_hint",
]

log = structlog.get_logger()


class Session:
    """A logged-in connection; call open(), then send() for each message, then close()."""

    def __init__(self, cfg: UpstreamConfig, local_hostname: str) -> None:
        self.cfg = cfg
        self.local_hostname = local_hostname
        self.smtp: aiosmtplib.SMTP | None = None
        self.timings: list[StepTiming] = []
        self.sent = 0
        self.extensions: dict[str, str] = {}
        self.mechanism = ""  # the SASL mechanism of an OAuth login
        self.channel: Channel | None = None  # the transaction path, once logged in

    def __repr__(self) -> str:
        return f"<upstream.Session {self.cfg.host}:{self.cfg.port} tls={self.cfg.tls}>"

    async def _step(self, name: str, coro: Any, **detail: Any) -> Any:
        start = time.monotonic()
        result = await coro
        self.timings.append(StepTiming(name, time.monotonic() - start, detail))
        return result

    async def open(self) -> None:
        """Connect, handshake, EHLO and AUTH; raise UpstreamError naming the failed step."""
        cfg = self.cfg
        sock = await connect_tcp(cfg, self.timings)
        ctx = tls_context(cfg) if cfg.tls != TlsMode.NONE else None
        smtp = aiosmtplib.SMTP(
            hostname=cfg.host,  # with sock=, only used for SNI and certificate checks
            sock=sock,
            use_tls=cfg.tls == TlsMode.IMPLICIT,
            start_tls=False,
            tls_context=ctx if cfg.tls == TlsMode.IMPLICIT else None,
            local_hostname=self.local_hostname,
            timeout=cfg.timeout,
        )
        self.smtp = smtp
        try:
            await self._step(
                "tls" if cfg.tls == TlsMode.IMPLICIT else "banner", self._handshake(smtp)
            )
            if cfg.tls == TlsMode.IMPLICIT:
                self.timings[-1].detail.update(tls_details(smtp))
            await self._ehlo(smtp)
            if cfg.tls == TlsMode.STARTTLS:
                await self._starttls(smtp, ctx)
            await self._authenticate(smtp)
            self.channel = Channel(hand_over(smtp, cfg.timeout), self.extensions)
        except BaseException:
            smtp.close()
            self.smtp = None
            raise

    async def _authenticate(self, smtp: aiosmtplib.SMTP) -> None:
        """AUTH as configured (OAuth bearer or password; none without a username)."""
        cfg = self.cfg
        if cfg.auth == UpstreamAuth.OAUTH2:
            reply = await self._step("auth", self._oauth_login(smtp))
            mechanism = self.mechanism.upper()
        elif cfg.username:
            reply = await self._step("auth", self._login(smtp))
            mechanism = (smtp.supported_auth_methods or ["?"])[0].upper()
        else:
            return
        self.timings[-1].detail.update(
            mechanism=mechanism,
            offered=" ".join(smtp.server_auth_methods).upper(),
            reply=f"{reply.code} {reply.message}",
        )

    async def _handshake(self, smtp: aiosmtplib.SMTP) -> None:
        cfg = self.cfg
        try:
            await smtp.connect()
        except aiosmtplib.SMTPConnectResponseError as exc:
            temporary = status(exc.code) == OutcomeStatus.TEMPORARY or exc.code == 554
            raise refused("greeting refused", "connect", exc, temporary=temporary) from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            banner = "server ready" in str(exc) or isinstance(cause, aiosmtplib.SMTPException)
            if cfg.tls != TlsMode.IMPLICIT or banner:
                raise UpstreamError(
                    f"no greeting from {cfg.host}:{cfg.port}: {cause}",
                    step="connect",
                    temporary=True,
                    hint="the server accepted TCP but never greeted",
                ) from exc
            raise UpstreamError(
                f"TLS with {cfg.host}:{cfg.port} failed: {describe(cause)}",
                step="tls",
                temporary=True,
                hint=tls_hint(cfg, cause),
            ) from exc

    async def _ehlo(self, smtp: aiosmtplib.SMTP) -> None:
        try:
            await self._step("ehlo", smtp.ehlo())
        except aiosmtplib.SMTPResponseException as exc:
            raise refused("EHLO refused", "ehlo", exc) from exc
        except aiosmtplib.SMTPException as exc:
            raise UpstreamError(f"EHLO failed: {exc}", step="ehlo", temporary=True) from exc
        self.extensions = dict(smtp.esmtp_extensions)

    async def _starttls(self, smtp: aiosmtplib.SMTP, ctx: ssl.SSLContext | None) -> None:
        if not smtp.supports_extension("starttls"):
            raise UpstreamError(
                f"{self.cfg.host} does not offer STARTTLS; refusing to continue in plaintext",
                step="tls",
                temporary=True,
                hint="use tls: implicit on port 465",
            )
        try:
            await self._step("tls", smtp.starttls(tls_context=ctx, server_hostname=self.cfg.host))
            self.timings[-1].detail.update(tls_details(smtp))
        except aiosmtplib.SMTPResponseException as exc:
            raise refused("STARTTLS refused", "tls", exc) from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            raise UpstreamError(
                f"STARTTLS handshake failed: {describe(cause)}",
                step="tls",
                temporary=True,
                hint=tls_hint(self.cfg, cause),
            ) from exc
        await self._ehlo(smtp)

    async def _login(self, smtp: aiosmtplib.SMTP) -> aiosmtplib.SMTPResponse:
        cfg = self.cfg
        try:
            return await smtp.login(cfg.username, cfg.password)
        except aiosmtplib.SMTPAuthenticationError as exc:
            # Postfix soft-bounces SASL failures: the mail waits, an operator fixes the login.
            hint = presets.auth_hint(cfg.preset) or auth_hint(cfg.host, exc.code, exc.message)
            raise refused("AUTH refused", "auth", exc, hint=hint) from exc
        except aiosmtplib.SMTPException as exc:
            raise UpstreamError(
                f"AUTH failed: {exc}",
                step="auth",
                temporary=True,
                hint="the server offers no AUTH mechanism relayd supports"
                if "not supported" in str(exc)
                else "",
            ) from exc

    async def _oauth_login(self, smtp: aiosmtplib.SMTP) -> aiosmtplib.SMTPResponse:
        """AUTH with a bearer token; a refused token is renewed once and AUTH retried once."""
        cfg = self.cfg
        mechanism = self.mechanism = _bearer_mechanism(
            cfg.oauth2.mechanism, smtp.server_auth_methods
        )
        source = oauth.source_for(cfg.oauth2, cfg.timeout)
        token = await _token(source.token(), cfg.name)
        reply = await self._bearer(smtp, mechanism, token)
        if reply.code != 235:
            token = await _token(source.renew(token), cfg.name)
            reply = await self._bearer(smtp, mechanism, token)
        if reply.code != 235:
            raise UpstreamError(
                f"AUTH {mechanism.upper()} refused: {reply.code} {reply.message}",
                step="auth",
                temporary=True,
                code=reply.code,
                text=reply.message,
                hint=oauth.rejected_hint(cfg.oauth2),
            )
        return reply

    async def _bearer(
        self, smtp: aiosmtplib.SMTP, mechanism: SaslMechanism, token: str
    ) -> aiosmtplib.SMTPResponse:
        user = self.cfg.username
        if mechanism == SaslMechanism.OAUTHBEARER:
            blob = oauth.sasl_oauthbearer(user, token)
        else:
            blob = oauth.sasl_xoauth2(user, token)
        try:
            reply = await smtp.execute_command(b"AUTH", mechanism.upper().encode(), blob.encode())
            if reply.code == 334:
                # The error arrives as a challenge (base64 JSON) the client must answer before
                # the final reply: an empty line for XOAUTH2, a lone ^A for OAUTHBEARER
                # (RFC 7628 §3.2.3).
                reply = await smtp.execute_command(
                    b"AQ==" if mechanism == SaslMechanism.OAUTHBEARER else b""
                )
        except aiosmtplib.SMTPException as exc:
            raise UpstreamError(f"AUTH failed: {exc}", step="auth", temporary=True) from exc
        return reply

    @property
    def pipelining(self) -> bool:
        """The server takes a flight of commands in one write (RFC 2920)."""
        return self.channel is not None and self.channel.pipelining

    async def send(self, mail_from: str, rcpt_to: list[str], data: bytes) -> list[Outcome]:
        """Send one message; per-recipient outcomes, or UpstreamError if the session broke."""
        [result] = await self.send_many([Submission(mail_from, tuple(rcpt_to), data)])
        if isinstance(result, UpstreamError):
            raise result
        return result

    async def send_many(self, subs: list[Submission]) -> list[Result]:
        """Send messages in flights (pipelined when the server allows); a result per message.

        A message's outcomes come only from the replies to its own commands; a message the
        session broke before its final reply gets the UpstreamError and is not delivered.
        """
        if self.channel is None:
            error = UpstreamError("session not open", step="connect", temporary=True)
            return [error for _ in subs]
        results = await self.channel.send_many(subs)
        self.sent += sum(not isinstance(r, UpstreamError) for r in results)
        return results

    async def close(self) -> None:
        """QUIT politely (bounded by the timeout), then drop the connection."""
        smtp, self.smtp = self.smtp, None
        channel, self.channel = self.channel, None
        if smtp is None:
            return
        try:
            if channel is not None:
                async with asyncio.timeout(min(self.cfg.timeout, 5.0)):
                    channel.link.write(b"QUIT\r\n")
                    await channel.link.read()
            elif smtp.is_connected:
                await smtp.quit(timeout=min(self.cfg.timeout, 5.0))
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            pass
        finally:
            if channel is not None:
                channel.link.close()
            smtp.close()


def _bearer_mechanism(configured: SaslMechanism, offered: list[str]) -> SaslMechanism:
    """The configured mechanism, or the other bearer one when only it is offered."""
    names = {m.lower() for m in offered}
    other = (
        SaslMechanism.OAUTHBEARER if configured == SaslMechanism.XOAUTH2 else SaslMechanism.XOAUTH2
    )
    for mechanism in (configured, other):
        if mechanism in names:
            return mechanism
    raise UpstreamError(
        f"the server offers neither XOAUTH2 nor OAUTHBEARER (AUTH {' '.join(sorted(names))})",
        step="auth",
        temporary=True,
        hint="this server takes no OAuth login: use auth: password",
    )


async def _token(pending: Any, name: str) -> str:
    """Await a token; the token endpoint's refusal or outage as an UpstreamError."""
    try:
        token: str = await pending
    except oauth.ReauthRequired as exc:
        # The token source does not know the upstream's name; its fix names the default one.
        fix = exc.fix.replace("oauth login default", f"oauth login {name}")
        raise UpstreamError(
            f"OAuth: {exc}", step="auth", temporary=True, text=str(exc), hint=fix, reauth=True
        ) from None
    except oauth.TokenError as exc:
        hint = "the token endpoint is unreachable or failing; relayd keeps retrying"
        if not exc.temporary:
            hint = "check upstream.oauth2 (scope, endpoints) against the provider's app settings"
        raise UpstreamError(f"OAuth: {exc}", step="token", temporary=True, hint=hint) from None
    return token
