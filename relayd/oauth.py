"""OAuth2 access tokens for the upstream login: provider presets, the token endpoint, SASL.

One TokenSource per credential and process keeps the access token in memory and refreshes it
ahead of expiry, at most one refresh in flight. A refresh token the provider rotates is on disk
(tmp, fsync, rename, directory fsync) before the access token that came with it is used, so a
crash after a refresh never leaves relayd holding only a token the provider has retired.
Errors are classified for the caller: ReauthRequired (an operator must log in again or fix
the client) and TokenUnavailable (network, 5xx, timeout: retry later).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import functools
import json
import os
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog

from relayd import logs
from relayd.config import OAuth2Config
from relayd.errors import RelaydError
from relayd.states import OAuth2Flow, OAuth2Provider

log = structlog.get_logger()

REFRESH_MARGIN = 600.0  # seconds before expiry a token is replaced (half its life if shorter)
MAX_BODY = 1 << 20  # bytes read from a token endpoint's reply
GOOGLE_SCOPE = "https://mail.google.com/"
MICROSOFT_SCOPE = "https://outlook.office.com/SMTP.Send"
MICROSOFT_APP_SCOPE = "https://outlook.office365.com/.default"
REAUTH_ERRORS = ("invalid_grant", "invalid_client", "unauthorized_client")


@dataclass(frozen=True, slots=True)
class Endpoints:
    token_url: str
    authorize_url: str
    device_authorization_url: str
    scope: str


def endpoints(cfg: OAuth2Config) -> Endpoints:
    """The provider's preset endpoints and scope, each overridden by the config when set."""
    if cfg.provider == OAuth2Provider.GOOGLE:
        preset = Endpoints(
            "https://oauth2.googleapis.com/token",
            "https://accounts.google.com/o/oauth2/v2/auth",
            "https://oauth2.googleapis.com/device/code",
            GOOGLE_SCOPE,
        )
    elif cfg.provider == OAuth2Provider.MICROSOFT:
        base = f"https://login.microsoftonline.com/{cfg.tenant or 'organizations'}/oauth2/v2.0"
        # offline_access is what makes Microsoft return a refresh token at all.
        scope = (
            MICROSOFT_APP_SCOPE
            if cfg.flow == OAuth2Flow.CLIENT_CREDENTIALS
            else f"offline_access {MICROSOFT_SCOPE}"
        )
        preset = Endpoints(f"{base}/token", f"{base}/authorize", f"{base}/devicecode", scope)
    else:
        preset = Endpoints("", "", "", "")
    return Endpoints(
        cfg.token_url or preset.token_url,
        cfg.authorize_url or preset.authorize_url,
        cfg.device_authorization_url or preset.device_authorization_url,
        cfg.scope or preset.scope,
    )


class TokenError(RelaydError):
    """The token endpoint refused or could not be asked; ``error`` is its OAuth error code."""

    temporary = False

    def __init__(self, message: str, error: str = "", fix: str = "") -> None:
        super().__init__(message)
        self.error = error
        self.fix = fix


class ReauthRequired(TokenError):
    """The grant or the client is no longer accepted: an operator must act (``fix`` says how)."""


class TokenUnavailable(TokenError):
    """Network error, timeout, 429 or 5xx from the token endpoint: try again later."""

    temporary = True


def register_secrets(cfg: OAuth2Config) -> None:
    """Make the client secret unloggable in this process (raw and base64)."""
    logs.add_secrets([cfg.client_secret])


def sasl_xoauth2(user: str, token: str) -> str:
    """Google's and Microsoft's XOAUTH2 initial response, base64."""
    raw = f"user={user}\x01auth=Bearer {token}\x01\x01"
    return _registered(raw, token)


def sasl_oauthbearer(user: str, token: str) -> str:
    """RFC 7628 §3.1 OAUTHBEARER initial response: gs2 header, then auth=Bearer, base64."""
    saslname = user.replace("=", "=3D").replace(",", "=2C")  # RFC 5801 §4
    raw = f"n,a={saslname},\x01auth=Bearer {token}\x01\x01"
    return _registered(raw, token)


def _registered(raw: str, token: str) -> str:
    blob = base64.b64encode(raw.encode()).decode()
    logs.add_secrets([token, raw])  # each raw and as base64 (the string sent)
    return blob


def fix_text(cfg: OAuth2Config, error: str, name: str = "default") -> str:
    """What an operator does about a refused grant or client; names no secret."""
    login = f"run `relayd oauth login {name}`"
    if error == "invalid_client":
        return (
            "the token endpoint refused the client: check upstream.oauth2.client_id and the "
            "client secret (secrets expire: Entra ID > App registrations > Certificates & secrets)"
        )
    if error == "unauthorized_client":
        return (
            "the app may not use this grant: check the app's type and, for the device code "
            "flow, 'Allow public client flows' in the app registration"
        )
    if error == "no_refresh_token":
        return f"no refresh token yet: {login}"
    if cfg.provider == OAuth2Provider.GOOGLE:
        return (
            "Google no longer accepts the refresh token (revoked, password changed, or the "
            "consent screen is still in Testing: 7-day tokens; publish it): " + login
        )
    return f"the refresh token was revoked or has expired: {login}"


def rejected_hint(cfg: OAuth2Config) -> str:
    """Why a provider may refuse a freshly issued token at AUTH, and what to change."""
    if cfg.provider == OAuth2Provider.MICROSOFT and cfg.flow == OAuth2Flow.CLIENT_CREDENTIALS:
        return (
            "Microsoft refused the app's token: grant SMTP.SendAsApp with admin consent, "
            "register the service principal in Exchange (New-ServicePrincipal) and give it "
            "FullAccess to the mailbox in upstream.username; SMTP AUTH must be on for it"
        )
    if cfg.provider == OAuth2Provider.MICROSOFT:
        return (
            "Microsoft refused the token: enable SMTP AUTH for the mailbox "
            "(Set-CASMailbox -SmtpClientAuthenticationDisabled $false) and check that "
            "upstream.username is the account that signed in"
        )
    if cfg.provider == OAuth2Provider.GOOGLE:
        return (
            "Google refused the token: the scope must be https://mail.google.com/ and "
            "upstream.username the account that consented"
        )
    return "the server refused the token: check upstream.oauth2.scope and upstream.username"


@functools.lru_cache(maxsize=4)
def tls_context(ca_file: str) -> ssl.SSLContext:
    """System trust store plus ca_file; certificates and host names always verified."""
    ctx = ssl.create_default_context()
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    return ctx


async def post_form(
    url: str, form: Mapping[str, str], ca_file: str, seconds: float, want: str = "access_token"
) -> dict[str, Any]:
    """POST a token request; the JSON reply carrying `want`, or a classified TokenError.

    The error's text names the host, the HTTP status and the provider's error, never the form.
    """
    host = urlsplit(url).hostname or url
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=seconds)) as http,
            http.post(
                url,
                data=dict(form),
                ssl=tls_context(ca_file),
                headers={"Accept": "application/json"},
                allow_redirects=False,
            ) as resp,
        ):
            status = resp.status
            body = b""
            async for chunk in resp.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > MAX_BODY:
                    raise TokenUnavailable(f"token endpoint {host} sent more than 1 MiB")
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        what = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
        raise TokenUnavailable(f"token endpoint {host} unreachable: {what}") from None
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        doc = {}
    if status == 200 and isinstance(doc.get(want), str):
        return doc
    return _refusal(host, status, doc)


def _refusal(host: str, status: int, doc: dict[str, Any]) -> dict[str, Any]:
    error = printable(str(doc.get("error", "")), 60)
    said = printable(str(doc.get("error_description", "")), 200)
    text = f"token endpoint {host} answered {status}" + (f" {error}" if error else "")
    text += f": {said}" if said else ""
    if status >= 500 or status == 429:
        raise TokenUnavailable(text, error)
    if error in REAUTH_ERRORS:
        raise ReauthRequired(text, error)
    raise TokenError(text, error or f"http_{status}")


def printable(text: str, limit: int) -> str:
    """A stranger's words, safe on a terminal: printable ASCII only, bounded."""
    return "".join(c if " " <= c <= "~" else "?" for c in text[:limit])


def write_secret_file(path: str, text: str) -> None:
    """Replace path with text, 0600, atomically: tmp, fsync, rename, directory fsync."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    dfd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_refresh_token(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return ""


def state_path(cfg: OAuth2Config) -> str:
    """Where expiry, last refresh and granted scopes are kept for `relayd oauth status`."""
    return cfg.refresh_token_file + ".state.json" if cfg.refresh_token_file else ""


def read_state(cfg: OAuth2Config) -> dict[str, Any]:
    path = state_path(cfg)
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8")) if path else {}
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def write_state(cfg: OAuth2Config, update: dict[str, Any]) -> None:
    """Merge update into the state file (a success clears the last error); no token in it."""
    path = state_path(cfg)
    if not path:
        return
    state = read_state(cfg)
    if "refreshed_at" in update:
        state.pop("error", None)
        state.pop("error_at", None)
    state.update(update)
    write_secret_file(path, json.dumps(state, sort_keys=True) + "\n")


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
