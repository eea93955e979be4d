"""`relayd oauth login` and `relayd oauth status` against the test provider: the device code
flow, the loopback redirect flow with PKCE and state, --no-browser, and the status report."""

from __future__ import annotations

import asyncio
import os
import ssl
import stat
import sys
from pathlib import Path

import aiohttp
import pytest
from conftest import USER, Pki
from oauthfake import FIRST_REFRESH, Provider, oauth_settings

from relayd import config as config_mod
from relayd import oauth
from relayd.cli import oauth as oauth_login
from relayd.config import OAuth2Config


@pytest.fixture
async def provider(pki: Pki):
    p = await Provider(pki.server_ctx).start()
    yield p
    await p.stop()


def settings(provider: Provider, pki: Pki, tmp_path: Path) -> dict[str, str]:
    s = oauth_settings(provider, pki.ca_file, tmp_path / "refresh")
    (tmp_path / "refresh").unlink()  # a first login: no refresh token yet
    return {"RELAYD_UPSTREAM_USERNAME": USER, **{f"RELAYD_{k.upper()}": v for k, v in s.items()}}


def cfg_for(provider: Provider, pki: Pki, tmp_path: Path) -> OAuth2Config:
    return config_mod.load(None, settings(provider, pki, tmp_path)).upstream.oauth2


class Browser:
    """Stands in for the operator's browser: follows the authorize URL to its redirect."""

    def __init__(self, pki: Pki) -> None:
        self.ctx = ssl.create_default_context(cafile=str(pki.ca_file))
        self.url: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def open(self, url: str) -> None:  # called from a thread, as webbrowser.open is
        self.url.get_loop().call_soon_threadsafe(self.url.set_result, url)

    def tell(self, line: str) -> None:
        for word in line.split():
            if word.startswith("https://") and "/authorize?" in word and not self.url.done():
                self.url.set_result(word)

    async def consent(self) -> str:
        """The redirect URL the provider sends the browser to after consent."""
        async with (
            aiohttp.ClientSession() as http,
            http.get(await self.url, ssl=self.ctx, allow_redirects=False) as resp,
        ):
            assert resp.status == 302
            return resp.headers["Location"]


async def test_device_flow_polls_until_signed_in(
    provider: Provider, pki: Pki, tmp_path: Path
) -> None:
    """Device code flow: the code and URL are shown, authorization_pending keeps polling at
    the server's interval, slow_down adds 5 s, and the grant carries a refresh token."""
    provider.device_script = ["authorization_pending", "slow_down", "authorization_pending"]
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    told: list[str] = []
    doc = await oauth_login.device_login(cfg_for(provider, pki, tmp_path), told.append, sleep)
    assert doc["refresh_token"] in provider.refresh_tokens
    assert "https://microsoft.test/devicelogin" in told[0] and "ABCD-EFGH" in told[0]
    assert waits == [0.05, 0.05, 5.05, 5.05]


async def test_device_flow_expired_code_is_a_clear_error(
    provider: Provider, pki: Pki, tmp_path: Path
) -> None:
    """expired_token while polling ends the login with 'run it again', not a traceback."""
    provider.device_script = ["authorization_pending", "expired_token"]

    async def sleep(seconds: float) -> None:
        return None

    with pytest.raises(oauth_login.LoginError, match="expired"):
        await oauth_login.device_login(cfg_for(provider, pki, tmp_path), print, sleep)


async def test_cli_device_login_writes_the_refresh_token_0600(
    provider: Provider, pki: Pki, tmp_path: Path
) -> None:
    """`relayd oauth login default` (device flow) writes refresh_token_file 0600 and prints
    the code, never a token."""
    provider.device_script = ["authorization_pending"]
    env = {**os.environ, **settings(provider, pki, tmp_path)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relayd", "oauth", "login", "default", "--flow", "device",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    text = out.decode()
    assert proc.returncode == 0, text
    path = tmp_path / "refresh"
    assert path.read_text().strip() in provider.refresh_tokens
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "ABCD-EFGH" in text and "signed in" in text
    assert not [s for s in provider.issued if s in text]


async def test_loopback_flow_refuses_a_wrong_state_then_signs_in(
    provider: Provider, pki: Pki, tmp_path: Path
) -> None:
    """Loopback flow: the listener is on 127.0.0.1; a redirect with a wrong state gets 400 and
    no code exchange; the genuine redirect completes the PKCE exchange."""
    browser = Browser(pki)
    cfg = cfg_for(provider, pki, tmp_path)
    login = asyncio.create_task(oauth_login.loopback_login(cfg, print, browser.open))
    redirect = await browser.consent()
    assert redirect.startswith("http://127.0.0.1:")
    forged = redirect.replace("state=", "state=forged")
    async with aiohttp.ClientSession() as http:
        async with http.get(forged) as resp:
            assert resp.status == 400
        assert provider.grants == []
        async with http.get(redirect) as resp:
            assert resp.status == 200
    doc = await asyncio.wait_for(login, 10)
    assert provider.grants == ["authorization_code"]
    assert doc["refresh_token"] in provider.refresh_tokens


async def test_no_browser_takes_the_pasted_url(
    provider: Provider, pki: Pki, tmp_path: Path
) -> None:
    """--no-browser: the URL is printed, the pasted redirect URL's code is exchanged."""
    browser = Browser(pki)
    cfg = cfg_for(provider, pki, tmp_path)
    doc = await oauth_login.loopback_login(cfg, browser.tell, pasted=browser.consent)
    scope = await oauth_login.save_grant(cfg, doc)
    assert Path(cfg.refresh_token_file).read_text().strip() == doc["refresh_token"]
    assert scope == "https://mail.google.com/"


async def test_no_browser_refuses_a_pasted_url_with_the_wrong_state(
    provider: Provider, pki: Pki, tmp_path: Path
) -> None:
    """A pasted redirect URL whose state is not this login's is refused before any exchange."""
    browser = Browser(pki)

    async def pasted() -> str:
        return (await browser.consent()).replace("state=", "state=other")

    with pytest.raises(oauth_login.LoginError, match="wrong state"):
        await oauth_login.loopback_login(
            cfg_for(provider, pki, tmp_path), browser.tell, pasted=pasted
        )
    assert provider.grants == []


async def test_status_shows_expiry_and_scopes_never_the_token(
    provider: Provider, pki: Pki, tmp_path: Path
) -> None:
    """After a refresh, status shows last refresh, expiry and scopes; no token appears."""
    cfg = cfg_for(provider, pki, tmp_path)
    oauth.write_secret_file(cfg.refresh_token_file, FIRST_REFRESH)
    await oauth.TokenSource(cfg, 5).token()
    lines, ok = oauth_login.status_lines(cfg, "default")
    text = "\n".join(lines)
    assert ok
    assert "scopes granted  https://mail.google.com/" in text
    assert "expires 20" in text and "last refresh    20" in text
    assert not [s for s in [FIRST_REFRESH, *provider.issued] if s in text]


async def test_status_after_invalid_grant_names_the_fix(
    provider: Provider, pki: Pki, tmp_path: Path
) -> None:
    """After invalid_grant, status reports the error with the login command, and not ok."""
    cfg = cfg_for(provider, pki, tmp_path)
    oauth.write_secret_file(cfg.refresh_token_file, "rt-revoked-000")
    with pytest.raises(oauth.ReauthRequired):
        await oauth.TokenSource(cfg, 5).token()
    lines, ok = oauth_login.status_lines(cfg, "default")
    assert not ok
    assert any("invalid_grant" in line for line in lines)
    assert any("relayd oauth login default" in line for line in lines)


def test_unknown_name_is_a_one_line_config_error(tmp_path: Path) -> None:
    """`relayd oauth status other` names the one upstream there is, exit 78."""
    import subprocess

    env = {**os.environ, "RELAYD_SPOOL_PATH": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "relayd", "oauth", "status", "other"],
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 78
    assert done.stderr.strip().splitlines() == [
        "relayd: config: upstream: no upstream named 'other' (this relayd has: default)"
    ]
