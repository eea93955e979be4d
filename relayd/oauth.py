"""OAuth2 access tokens for the upstream login: provider presets, the token endpoint, SASL.

One TokenSource per credential and process keeps the access token in memory and refreshes it
ahead of expiry, at most one refresh in flight. A refresh token the provider rotates is on disk
(tmp, fsync, rename, directory fsync) before the access token that came with it is used, so a
crash after a refresh never leaves relayd holding only a token the provider has retired.
Errors are classified for the caller: ReauthRequired (an operator must log in again or fix
the client) and TokenUnavailable (network, 5xx, timeout: retry later).

This module is the token client; what is asked of the provider (presets, the POST, its errors,
SASL strings) is in oauth_endpoint and what is kept on disk in oauth_store, both re-exported.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from relayd import logs
from relayd.config import OAuth2Config
from relayd.oauth_endpoint import (
    GOOGLE_SCOPE,
    MAX_BODY,
    MICROSOFT_APP_SCOPE,
    MICROSOFT_SCOPE,
    REAUTH_ERRORS,
    Endpoints,
    ReauthRequired,
    TokenError,
    TokenUnavailable,
    endpoints,
    fix_text,
    post_form,
    printable,
    register_secrets,
    rejected_hint,
    sasl_oauthbearer,
    sasl_xoauth2,
    tls_context,
)
from relayd.oauth_store import (
    read_refresh_token,
    read_state,
    state_path,
    utc_now,
    write_secret_file,
    write_state,
)
from relayd.states import OAuth2Flow, OAuth2Provider

# The endpoint's and the store's names stay importable from relayd.oauth, as before.
__all__ = [
    "GOOGLE_SCOPE",
    "MAX_BODY",
    "MICROSOFT_APP_SCOPE",
    "MICROSOFT_SCOPE",
    "REAUTH_ERRORS",
    "REFRESH_MARGIN",
    "Endpoints",
    "ReauthRequired",
    "Token",
    "TokenError",
    "TokenSource",
    "TokenUnavailable",
    "endpoints",
    "fix_text",
    "post_form",
    "printable",
    "read_refresh_token",
    "read_state",
    "register_secrets",
    "rejected_hint",
    "sasl_oauthbearer",
    "sasl_xoauth2",
    "source_for",
    "state_path",
    "tls_context",
    "utc_now",
    "write_secret_file",
    "write_state",
]

log = structlog.get_logger()

REFRESH_MARGIN = 600.0  # seconds before expiry a token is replaced (half its life if shorter)


@dataclass(frozen=True, slots=True)
class Token:
    access_token: str = field(repr=False)
    expires_at: float  # on the monotonic clock: wall-clock skew cannot age it
    lifetime: float
    scope: str

    def fresh(self, now: float) -> bool:
        return now < self.expires_at - min(REFRESH_MARGIN, self.lifetime / 2)


class TokenSource:
    """Access tokens for one credential; token() is cheap while the cached one is fresh."""

    def __init__(
        self, cfg: OAuth2Config, timeout: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.cfg = cfg
        self.timeout = timeout
        self.clock = clock
        self.refreshes = 0
        self._token: Token | None = None
        self._inflight: asyncio.Task[Token] | None = None
        self._dead = ""  # a refresh token the provider refused: not sent again
        self._dead_error = ""
        register_secrets(cfg)

    def __repr__(self) -> str:
        return f"<oauth.TokenSource {self.cfg.provider} {self.cfg.flow}>"

    async def token(self) -> str:
        """A token valid for the next REFRESH_MARGIN seconds; refreshes (once) if needed."""
        tok = self._token
        if tok is not None and tok.fresh(self.clock()):
            return tok.access_token
        return (await self._refresh_once()).access_token

    async def renew(self, rejected: str) -> str:
        """A new token after the server refused `rejected` (unless another session did it)."""
        tok = self._token
        if tok is not None and tok.access_token == rejected:
            self._token = None
        return await self.token()

    async def _refresh_once(self) -> Token:
        loop = asyncio.get_running_loop()
        task = self._inflight
        if task is None or task.done() or task.get_loop() is not loop:
            task = loop.create_task(self._refresh())
            task.add_done_callback(self._refreshed)
            self._inflight = task
        # Shielded: a session cancelled while waiting must not cancel the others' refresh.
        return await asyncio.shield(task)

    def _refreshed(self, task: asyncio.Task[Token]) -> None:
        if self._inflight is task:
            self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved here, so no waiter's absence is logged as a leak

    async def _refresh(self) -> Token:
        cfg = self.cfg
        ends = endpoints(cfg)
        current = ""
        form = {"client_id": cfg.client_id}
        if cfg.client_secret:
            form["client_secret"] = cfg.client_secret
        if cfg.flow == OAuth2Flow.CLIENT_CREDENTIALS:
            form.update(grant_type="client_credentials", scope=ends.scope)
        else:
            current = await asyncio.to_thread(read_refresh_token, cfg.refresh_token_file)
            if not current:
                fix = fix_text(cfg, "no_refresh_token")
                raise ReauthRequired(f"{cfg.refresh_token_file} is empty or missing", "", fix)
            if current == self._dead:  # not sent again: providers throttle repeated bad grants
                error = self._dead_error
                raise ReauthRequired(
                    f"the token endpoint refused this refresh token ({error}); it is not "
                    "sent again until the file changes",
                    error,
                    fix_text(cfg, error),
                )
            logs.add_secrets([current])
            form.update(grant_type="refresh_token", refresh_token=current)
            if (
                cfg.provider != OAuth2Provider.GOOGLE
            ):  # Google keeps the consented scope; others want it
                form["scope"] = ends.scope
        self.refreshes += 1
        try:
            doc = await post_form(ends.token_url, form, cfg.ca_file, self.timeout)
        except ReauthRequired as exc:
            self._dead, self._dead_error = current, exc.error
            exc.fix = fix_text(cfg, exc.error)
            await asyncio.to_thread(write_state, cfg, {"error": exc.error, "error_at": utc_now()})
            raise
        return await self._accept(doc, current)

    async def _accept(self, doc: dict[str, Any], current: str) -> Token:
        cfg = self.cfg
        access = str(doc["access_token"])
        rotated = doc.get("refresh_token")
        logs.add_secrets([access, *([str(rotated)] if rotated else [])])
        if isinstance(rotated, str) and rotated and rotated != current:
            # On disk before use: after a crash from here on, the file holds the live token.
            await asyncio.to_thread(write_secret_file, cfg.refresh_token_file, rotated)
        lifetime = _seconds(doc.get("expires_in"))
        scope = str(doc.get("scope") or endpoints(cfg).scope)
        token = Token(access, self.clock() + lifetime, lifetime, scope)
        self._token = token
        now = dt.datetime.now(dt.UTC)
        state = {
            "refreshed_at": utc_now(),
            "expires_at": (now + dt.timedelta(seconds=lifetime)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "scope": scope,
        }
        await asyncio.to_thread(write_state, cfg, state)
        log.info(
            "oauth.token_refreshed",
            provider=cfg.provider,
            flow=cfg.flow,
            expires_in=lifetime,
            rotated=bool(rotated and rotated != current),
        )
        return token


def _seconds(value: Any) -> float:
    """expires_in as float seconds; absent or nonsense means the usual hour (RFC 6749 §5.1)."""
    with contextlib.suppress(TypeError, ValueError):
        seconds = float(value)
        if 0 < seconds < 86_400 * 30:
            return seconds
    return 3600.0


_SOURCES: dict[tuple[OAuth2Config, float], TokenSource] = {}


def source_for(cfg: OAuth2Config, timeout: float) -> TokenSource:
    """The process's one TokenSource for this credential, shared by every session."""
    key = (cfg, timeout)
    source = _SOURCES.get(key)
    if source is None:
        source = _SOURCES[key] = TokenSource(cfg, timeout)
    return source
