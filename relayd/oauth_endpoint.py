"""The provider's side of OAuth2: preset endpoints, the token endpoint's replies, SASL strings.

What relayd.oauth's TokenSource (and `relayd oauth login`) ask a provider, and how its answers
and refusals are told apart: ReauthRequired (an operator must log in again or fix the client)
and TokenUnavailable (network, 5xx, timeout: retry later).
"""

from __future__ import annotations

import base64
import functools
import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from relayd import logs
from relayd.config import OAuth2Config
from relayd.errors import RelaydError
from relayd.states import OAuth2Flow, OAuth2Provider

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
