"""`relayd oauth login NAME` and `relayd oauth status NAME`: the first refresh token, and what
relayd knows about its tokens (expiry, last refresh, scopes), never a token itself.

Two ways to sign in: the device code flow (RFC 8628; Microsoft's default), where relayd prints
a URL and a code and polls, and the loopback redirect flow (RFC 8252 with PKCE S256, RFC 7636;
Google's), where a listener on 127.0.0.1 at a random port takes the browser's redirect and
checks ``state``. ``--no-browser`` prints the URL and reads the redirect URL pasted back.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import secrets
import socket
import sys
import time
import webbrowser
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from aiohttp import web

from relayd import logs, oauth
from relayd.cli.common import load_config, say
from relayd.config import OAuth2Config
from relayd.errors import ConfigError, RelaydError
from relayd.states import OAuth2Flow, OAuth2Provider, UpstreamAuth

LOGIN_TIMEOUT = 600.0  # seconds a sign-in may take in the browser
REQUEST_TIMEOUT = 30.0  # seconds for each request to the provider
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"

Say = Callable[[str], None]


class LoginError(RelaydError):
    """The sign-in did not produce a refresh token; the message says what to do."""


async def device_login(
    cfg: OAuth2Config, tell: Say, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
) -> dict[str, Any]:
    """RFC 8628: show the code, poll at the server's interval (+5 s per slow_down)."""
    ends = oauth.endpoints(cfg)
    if not ends.device_authorization_url:
        raise ConfigError("upstream.oauth2.device_authorization_url", "required for device login")
    form = {"client_id": cfg.client_id, "scope": ends.scope}
    grant = await oauth.post_form(
        ends.device_authorization_url, form, cfg.ca_file, REQUEST_TIMEOUT, want="device_code"
    )
    where = grant.get("verification_uri") or grant.get("verification_url")  # Google's name
    uri = oauth.printable(str(where or ""), 200)
    code = oauth.printable(str(grant.get("user_code", "")), 40)
    tell(f"To sign in, open {uri} and enter the code {code}")
    interval = _number(grant.get("interval"), 5.0)  # RFC 8628 §3.2: 5 s if absent
    deadline = time.monotonic() + _number(grant.get("expires_in"), 900.0)
    poll = {"grant_type": DEVICE_GRANT, "device_code": str(grant["device_code"])}
    poll["client_id"] = cfg.client_id
    if cfg.client_secret:
        poll["client_secret"] = cfg.client_secret
    while time.monotonic() < deadline:
        await sleep(interval)
        try:
            return await oauth.post_form(ends.token_url, poll, cfg.ca_file, REQUEST_TIMEOUT)
        except oauth.TokenError as exc:
            if exc.error == "slow_down":
                interval += 5.0  # RFC 8628 §3.5
            elif exc.error == "expired_token":
                raise LoginError("the code expired before sign-in finished: run it again") from None
            elif exc.error in ("access_denied", "authorization_declined"):
                raise LoginError("sign-in was declined in the browser") from None
            elif exc.error != "authorization_pending" and not exc.temporary:
                raise
    raise LoginError("the code expired before sign-in finished: run it again")


def _number(value: Any, default: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if 0 <= number < 86_400 else default


def pkce_pair() -> tuple[str, str]:
    """(verifier, S256 challenge), RFC 7636 §4.1-4.2."""
    verifier = secrets.token_urlsafe(64)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def authorize_url(cfg: OAuth2Config, redirect_uri: str, state: str, challenge: str) -> str:
    ends = oauth.endpoints(cfg)
    if not ends.authorize_url:
        raise ConfigError("upstream.oauth2.authorize_url", "required for browser login")
    query = {
        "response_type": "code",
        "client_id": cfg.client_id,
        "redirect_uri": redirect_uri,
        "scope": ends.scope,
        "state": state,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "prompt": "consent",  # Google returns a refresh token only with a fresh consent
    }
    if cfg.provider == OAuth2Provider.GOOGLE:
        query["access_type"] = "offline"
    return f"{ends.authorize_url}?{urlencode(query)}"


def code_from(query: dict[str, list[str]], state: str) -> str:
    """The authorization code from a redirect's query, after checking state (RFC 6749 §10.12)."""
    got = (query.get("state") or [""])[0]
    if not hmac.compare_digest(got.encode(), state.encode()):
        raise LoginError("the redirect carries the wrong state: not the sign-in relayd started")
    if "error" in query:
        error = oauth.printable(query["error"][0], 60)
        raise LoginError(f"the provider refused the sign-in: {error}")
    code = (query.get("code") or [""])[0]
    if not code:
        raise LoginError("the redirect carries no code")
    return code


async def loopback_login(
    cfg: OAuth2Config,
    tell: Say,
    open_url: Callable[[str], Any] = webbrowser.open,
    pasted: Callable[[], Awaitable[str]] | None = None,
) -> dict[str, Any]:
    """RFC 8252 §7.3: a redirect to 127.0.0.1 on a random port; PKCE S256 and state checked.

    With `pasted` (--no-browser) nothing listens: the operator's browser, on another machine,
    fails to load the redirect, and the URL it shows is pasted back.
    """
    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(24)
    if pasted is not None:
        redirect_uri = f"http://127.0.0.1:{_unused_port()}/"
        tell(
            "Open this URL in a browser and sign in:\n"
            + authorize_url(cfg, redirect_uri, state, challenge)
        )
        tell("The browser then fails to load a 127.0.0.1 page: paste that page's full URL here.")
        line = (await pasted()).strip()
        code = code_from(parse_qs(urlsplit(line).query), state)
    else:
        code, redirect_uri = await _listen_for_code(cfg, tell, open_url, state, challenge)
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "client_id": cfg.client_id,
        "code_verifier": verifier,
    }
    if cfg.client_secret:
        form["client_secret"] = cfg.client_secret
    ends = oauth.endpoints(cfg)
    return await oauth.post_form(ends.token_url, form, cfg.ca_file, REQUEST_TIMEOUT)


async def _listen_for_code(
    cfg: OAuth2Config, tell: Say, open_url: Callable[[str], Any], state: str, challenge: str
) -> tuple[str, str]:
    loop = asyncio.get_running_loop()
    got: asyncio.Future[str] = loop.create_future()

    async def redirect(request: web.Request) -> web.Response:
        try:
            code = code_from({k: request.query.getall(k) for k in request.query}, state)
        except LoginError as exc:
            if "wrong state" in str(exc):
                tell("refused a redirect with the wrong state (still waiting for yours)")
                return web.Response(status=400, text=f"relayd: {exc}\n")
            if not got.done():
                got.set_exception(exc)
            return web.Response(status=400, text=f"relayd: {exc}\n")
        if not got.done():
            got.set_result(code)
        return web.Response(text="relayd: signed in. You can close this tab.\n")

    app = web.Application()
    app.router.add_get("/", redirect)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)  # loopback only, a port the OS picks
        await site.start()
        redirect_uri = f"http://127.0.0.1:{runner.addresses[0][1]}/"
        url = authorize_url(cfg, redirect_uri, state, challenge)
        tell("Opening the browser to sign in; if it does not open, visit:\n" + url)
        await asyncio.to_thread(open_url, url)
        try:
            async with asyncio.timeout(LOGIN_TIMEOUT):
                return await got, redirect_uri
        except TimeoutError:
            raise LoginError("no sign-in within 10 minutes: run it again") from None
    finally:
        await runner.cleanup()


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def save_grant(cfg: OAuth2Config, doc: dict[str, Any]) -> str:
    """Write the refresh token (atomically, 0600) and the state; the scopes granted."""
    refresh = doc.get("refresh_token")
    logs.add_secrets([str(doc.get("access_token", "")), str(refresh or "")])
    if not isinstance(refresh, str) or not refresh:
        raise LoginError(
            "the provider returned no refresh token (Microsoft: the offline_access scope; "
            "Google: revoke relayd's access in the account's security page, then log in again)"
        )
    await asyncio.to_thread(oauth.write_secret_file, cfg.refresh_token_file, refresh + "\n")
    scope = str(doc.get("scope") or oauth.endpoints(cfg).scope)
    await asyncio.to_thread(
        oauth.write_state, cfg, {"logged_in_at": oauth.utc_now(), "scope": scope}
    )
    return scope


def flow_for(cfg: OAuth2Config, requested: str) -> str:
    if requested:
        return requested
    if cfg.provider == OAuth2Provider.MICROSOFT or not oauth.endpoints(cfg).authorize_url:
        return "device"
    return "browser"


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    cmd = sub.add_parser(
        "oauth", help="sign in to the provider (OAuth2Config) and show token state"
    )
    inner = cmd.add_subparsers(dest="oauth_command", required=True, parser_class=type(cmd))
    login = inner.add_parser("login", parents=[common], help="obtain the first refresh token")
    login.add_argument(
        "name", help='the upstream\'s name ("default" for the single upstream: section)'
    )
    login.add_argument("--flow", choices=["device", "browser"], help="default: by provider")
    login.add_argument("--no-browser", action="store_true", help="print the URL, paste back")
    login.set_defaults(func=cmd_login)
    status = inner.add_parser("status", parents=[common], help="token expiry, refresh, scopes")
    status.add_argument(
        "name", help='the upstream\'s name ("default" for the single upstream: section)'
    )
    status.set_defaults(func=cmd_status)


def _oauth_config(args: argparse.Namespace) -> OAuth2Config:
    ups = load_config(args).upstreams
    up = next((u for u in ups if u.name == args.name), None)
    if up is None:
        known = ", ".join(u.name for u in ups)
        raise ConfigError("upstream", f"no upstream named {args.name!r} (this relayd has: {known})")
    logs.setup("console", "warning")  # warnings only, and through the redaction backstop
    if up.auth != UpstreamAuth.OAUTH2:
        raise ConfigError(f"{up.name}.auth", "is not oauth2: nothing to log in to")
    oauth.register_secrets(up.oauth2)
    return up.oauth2


def cmd_login(args: argparse.Namespace) -> int:
    cfg = _oauth_config(args)
    if cfg.flow == OAuth2Flow.CLIENT_CREDENTIALS:
        asyncio.run(oauth.TokenSource(cfg, REQUEST_TIMEOUT).token())
        say("flow client_credentials needs no sign-in: the token endpoint issued a token")
        return 0
    flow = flow_for(cfg, args.flow or "")
    if flow == "device":
        doc = asyncio.run(device_login(cfg, say))
    else:
        pasted = _read_pasted if args.no_browser else None
        doc = asyncio.run(loopback_login(cfg, say, pasted=pasted))
    scope = asyncio.run(save_grant(cfg, doc))
    say(f"signed in: refresh token written to {cfg.refresh_token_file} (scopes: {scope})")
    return 0


async def _read_pasted() -> str:
    return await asyncio.to_thread(sys.stdin.readline)


def status_lines(cfg: OAuth2Config, name: str) -> tuple[list[str], bool]:
    """What `relayd oauth status` prints, and whether the credential looks usable."""
    state = oauth.read_state(cfg)
    lines = [f"upstream {name}: provider {cfg.provider}, flow {cfg.flow}"]
    ok = True
    if cfg.flow == OAuth2Flow.REFRESH_TOKEN:
        present = bool(oauth.read_refresh_token(cfg.refresh_token_file))
        ok = present
        what = "present" if present else f"missing: run `relayd oauth login {name}`"
        lines.append(f"  refresh token   {cfg.refresh_token_file} ({what})")
    lines.append(f"  signed in       {state.get('logged_in_at', 'unknown')}")
    lines.append(f"  last refresh    {state.get('refreshed_at', 'never')}")
    lines.append(f"  access token    expires {state.get('expires_at', 'unknown')}")
    lines.append(f"  scopes granted  {state.get('scope', 'unknown')}")
    if state.get("error"):
        ok = False
        error = oauth.printable(str(state["error"]), 60)
        lines.append(f"  last error      {error} at {state.get('error_at', '?')}")
        lines.append(f"  fix             {oauth.fix_text(cfg, error, name)}")
    return lines, ok


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _oauth_config(args)
    lines, ok = status_lines(cfg, args.name)
    for line in lines:
        say(line)
    return 0 if ok else 1
