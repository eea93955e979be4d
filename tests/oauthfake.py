"""A real OAuth2 provider for tests: a token endpoint over TLS (aiohttp, trustme certificate)
with the device code and authorization code grants, and an SMTP upstream (aiosmtpd, TLS) whose
XOAUTH2 and OAUTHBEARER check the SASL string and the token against what the endpoint issued."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import ssl
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from aiohttp import web
from aiosmtpd.smtp import SMTP, AuthResult
from conftest import OAUTH_CLIENT_SECRET as CLIENT_SECRET
from conftest import OAUTH_FIRST_REFRESH as FIRST_REFRESH
from conftest import SECRET_FORMS, USER, Sink, bearer_forms

CLIENT_ID = "relayd-test-client"
BAD_TOKEN_JSON = {"status": "401", "schemes": "bearer", "scope": "https://mail.google.com/"}


@dataclass
class Provider:
    """Issues and checks tokens; scriptable: rotate, refuse, fail, stall."""

    ssl_ctx: ssl.SSLContext
    rotate: bool = False
    lifetime: float = 3600.0
    error: str = ""  # an OAuth error code every refresh answers, e.g. invalid_grant
    status: int = 0  # an HTTP status every request answers, e.g. 503
    refresh_tokens: set[str] = field(default_factory=lambda: {FIRST_REFRESH})
    access: dict[str, float] = field(default_factory=dict)  # token -> expiry (monotonic)
    issued: list[str] = field(default_factory=list)  # every secret handed out
    grants: list[str] = field(default_factory=list)  # grant_type of every token request
    refreshed: asyncio.Event = field(default_factory=asyncio.Event)
    device_script: list[str] = field(default_factory=list)  # errors before the device grant
    device_interval: float = 0.05
    codes: dict[str, dict[str, str]] = field(default_factory=dict)
    port: int = 0
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def refreshes(self) -> int:
        return self.grants.count("refresh_token")

    async def start(self, port: int = 0) -> Provider:
        app = web.Application()
        app.router.add_post("/token", self.token)
        app.router.add_post("/devicecode", self.devicecode)
        app.router.add_get("/authorize", self.authorize)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(
            self.runner,
            "127.0.0.1",
            port or self.port,
            ssl_context=self.ssl_ctx,
            reuse_address=True,
        )
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        """Down: connections refused until start() again (same port)."""
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def valid(self, token: str) -> bool:
        return self.access.get(token, 0.0) > time.monotonic()

    def expire_all(self) -> None:
        """The provider ends every access token early (revocation, its own clock)."""
        self.access.clear()

    def _issue(self, refresh: str | None) -> dict[str, Any]:
        token = "at-" + secrets.token_urlsafe(24)
        self.access[token] = time.monotonic() + self.lifetime
        self._hand_out(token)
        doc: dict[str, Any] = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": self.lifetime,
            "scope": "https://mail.google.com/",
        }
        if refresh:
            doc["refresh_token"] = refresh
        return doc

    def _new_refresh(self) -> str:
        token = "rt-" + secrets.token_urlsafe(24)
        self.refresh_tokens.add(token)
        self._hand_out(token)
        return token

    def _hand_out(self, token: str) -> None:
        self.issued.append(token)
        SECRET_FORMS.extend(bearer_forms(USER, token))  # the suite's secret check covers it

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        grant = str(form.get("grant_type", ""))
        self.grants.append(grant)
        if self.status:
            return web.json_response({"error": "temporarily_unavailable"}, status=self.status)
        if form.get("client_id") != CLIENT_ID:
            return _error("invalid_client")
        if grant == "refresh_token":
            return self._refresh(str(form.get("refresh_token", "")))
        if grant == "client_credentials":
            ok = form.get("client_secret") == CLIENT_SECRET
            return web.json_response(self._issue(None)) if ok else _error("invalid_client")
        if grant == "urn:ietf:params:oauth:grant-type:device_code":
            if self.device_script:
                return _error(self.device_script.pop(0))
            return web.json_response(self._issue(self._new_refresh()))
        if grant == "authorization_code":
            return self._code(form)
        return _error("unsupported_grant_type")

    def _refresh(self, current: str) -> web.Response:
        if self.error or current not in self.refresh_tokens:
            return _error(self.error or "invalid_grant")
        refresh = None
        if self.rotate:
            self.refresh_tokens.discard(current)  # strict rotation: the old one is dead
            refresh = self._new_refresh()
        self.refreshed.set()
        return web.json_response(self._issue(refresh))

    async def devicecode(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("client_id") != CLIENT_ID:
            return _error("invalid_client")
        return web.json_response(
            {
                "device_code": "dc-" + secrets.token_urlsafe(8),
                "user_code": "ABCD-EFGH",
                "verification_uri": "https://microsoft.test/devicelogin",
                "expires_in": 900,
                "interval": self.device_interval,
            }
        )

    async def authorize(self, request: web.Request) -> web.Response:
        """The consent page, already consented: redirect back with a code and the state."""
        q = request.query
        if q.get("code_challenge_method") != "S256" or q.get("client_id") != CLIENT_ID:
            return web.Response(status=400, text="PKCE S256 and a known client required")
        code = "code-" + secrets.token_urlsafe(8)
        self.codes[code] = {"challenge": q["code_challenge"], "redirect_uri": q["redirect_uri"]}
        query = urlencode({"code": code, "state": q["state"], "scope": q["scope"]})
        raise web.HTTPFound(f"{q['redirect_uri']}?{query}")

    def _code(self, form: Any) -> web.Response:
        grant = self.codes.pop(str(form.get("code", "")), None)
        if grant is None or form.get("redirect_uri") != grant["redirect_uri"]:
            return _error("invalid_grant")
        verifier = str(form.get("code_verifier", "")).encode()
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier).digest()).rstrip(b"=")
        if challenge.decode() != grant["challenge"]:
            return _error("invalid_grant")
        return web.json_response(self._issue(self._new_refresh()))


def _error(code: str) -> web.Response:
    return web.json_response({"error": code, "error_description": f"test says {code}"}, status=400)


@dataclass
class OAuthSink(Sink):
    """The TLS upstream, taking only bearer logins that carry a token the provider issued."""

    provider: Provider | None = None
    refused_tokens: int = 0
    bad_strings: int = 0
    bearer_users: list[str] = field(default_factory=list)

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        return await self._bearer(server, args, b"user=", b"", b"")

    async def auth_OAUTHBEARER(self, server: SMTP, args: list[str]) -> AuthResult:
        return await self._bearer(server, args, b"n,a=", b",", b"\x01")

    async def _bearer(
        self, server: SMTP, args: list[str], head: bytes, sep: bytes, answer: bytes
    ) -> AuthResult:
        blob = base64.b64decode(args[1]) if len(args) > 1 else b""
        user, token = _parse(blob, head, sep)
        if user is None or token is None:
            self.bad_strings += 1
            return AuthResult(success=False, handled=False, message="501 5.5.2 bad SASL string")
        assert self.provider is not None
        if not self.provider.valid(token):
            self.refused_tokens += 1
            # The providers' way: the error as a challenge, then 535 after the client's answer.
            reply = await server.challenge_auth(json.dumps(BAD_TOKEN_JSON))
            if reply != answer:
                self.bad_strings += 1
            return AuthResult(success=False, handled=False, message="535 5.7.8 token refused")
        self.bearer_users.append(user)
        return AuthResult(success=True, auth_data=user)


def _parse(blob: bytes, head: bytes, sep: bytes) -> tuple[str | None, str | None]:
    """(user, token) from an exact XOAUTH2 or OAUTHBEARER string, else (None, None)."""
    if not blob.startswith(head) or not blob.endswith(b"\x01\x01"):
        return None, None
    if sep:  # OAUTHBEARER: "n,a=user,\x01auth=Bearer token\x01\x01"
        gs2, _, rest = blob.partition(b"\x01")
        if not gs2.endswith(b","):
            return None, None
        user = gs2[len(head) : -1]
    else:  # XOAUTH2: "user=user\x01auth=Bearer token\x01\x01"
        user, _, rest = blob[len(head) :].partition(b"\x01")
    if not rest.startswith(b"auth=Bearer ") or rest.count(b"\x01") != 2:
        return None, None
    token = rest[len(b"auth=Bearer ") : -2]
    return user.decode().replace("=2C", ",").replace("=3D", "="), token.decode()


async def start_oauth_sink(
    sink: OAuthSink, ssl_ctx: ssl.SSLContext, offer: tuple[str, ...] = ("XOAUTH2", "OAUTHBEARER")
) -> OAuthSink:
    loop = asyncio.get_running_loop()
    hidden = [m for m in ("PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER") if m not in offer]
    hidden.append("failures")  # aiosmtpd takes Sink.auth_failures for a mechanism's method

    def factory() -> SMTP:
        sink.sessions += 1
        proto = SMTP(
            sink,
            hostname="upstream.test",
            auth_require_tls=False,
            auth_required=True,
            auth_exclude_mechanism=hidden,
        )
        sink.protocols.append(proto)
        return proto

    sink.server = await loop.create_server(factory, "127.0.0.1", 0, ssl=ssl_ctx)
    sink.port = sink.server.sockets[0].getsockname()[1]
    return sink


def oauth_settings(
    provider: Provider, ca_file: Any, token_file: Any, **extra: str
) -> dict[str, str]:
    """RELAYD_* settings (without the prefix) for auth: oauth2 against the test provider."""
    token_file.write_text(FIRST_REFRESH + "\n")
    token_file.chmod(0o600)
    settings = {
        "upstream_auth": "oauth2",
        "upstream_password": "",
        "upstream_oauth2_provider": "custom",
        "upstream_oauth2_client_id": CLIENT_ID,
        "upstream_oauth2_client_secret": CLIENT_SECRET,
        "upstream_oauth2_token_url": f"{provider.url}/token",
        "upstream_oauth2_device_authorization_url": f"{provider.url}/devicecode",
        "upstream_oauth2_authorize_url": f"{provider.url}/authorize",
        "upstream_oauth2_scope": "https://mail.google.com/",
        "upstream_oauth2_refresh_token_file": str(token_file),
        "upstream_oauth2_ca_file": str(ca_file),
    }
    settings.update(extra)
    return settings
