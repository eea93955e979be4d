"""OAuth core: SASL strings, config, and a TokenSource against a real TLS token endpoint."""

from __future__ import annotations

import asyncio
import base64
import os
import stat
from pathlib import Path

import pytest
from conftest import USER, Pki, free_port
from oauthfake import CLIENT_SECRET, FIRST_REFRESH, Provider, oauth_settings

from relayd import config as config_mod
from relayd import logs, oauth
from relayd.config import OAuth2Config
from relayd.errors import ConfigError


@pytest.fixture
async def provider(pki: Pki):
    p = await Provider(pki.server_ctx).start()
    yield p
    await p.stop()


def oauth_cfg(provider: Provider, pki: Pki, tmp_path: Path, **extra: str) -> OAuth2Config:
    env = {"RELAYD_UPSTREAM_USERNAME": USER}
    settings = oauth_settings(provider, pki.ca_file, tmp_path / "refresh", **extra)
    env.update({f"RELAYD_{k.upper()}": v for k, v in settings.items()})
    return config_mod.load(None, env).upstream.oauth2


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_xoauth2_string_is_the_documented_format() -> None:
    """XOAUTH2 is base64 of user=U ^A auth=Bearer T ^A ^A (Google's and Microsoft's docs)."""
    blob = oauth.sasl_xoauth2(
        "someuser@example.com", "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg"
    )
    assert base64.b64decode(blob) == (
        b"user=someuser@example.com\x01"
        b"auth=Bearer ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg\x01\x01"
    )


def test_oauthbearer_string_has_the_gs2_header_and_escapes_the_name() -> None:
    """OAUTHBEARER is n,a=<saslname>, ^A auth=Bearer T ^A ^A with , and = escaped (RFC 7628)."""
    blob = oauth.sasl_oauthbearer("a,b=c@example.com", "tok-123")
    assert base64.b64decode(blob) == b"n,a=a=2Cb=3Dc@example.com,\x01auth=Bearer tok-123\x01\x01"


def test_sasl_strings_are_redacted_from_logs() -> None:
    """The token and the whole base64 SASL string are registered with the log redactor."""
    blob = oauth.sasl_xoauth2(USER, "tok-never-logged-42")
    assert logs.redact(f"sent {blob} and tok-never-logged-42") == "sent ******** and ********"


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        ("upstream_oauth2_client_id", "", "upstream.oauth2.client_id: required"),
        ("upstream_oauth2_provider", "yahoo", "upstream.oauth2.provider: google|microsoft|custom"),
        ("upstream_oauth2_token_url", "http://127.0.0.1/token", "must be an https:// URL"),
        ("upstream_oauth2_refresh_token_file", "", "upstream.oauth2.refresh_token_file: required"),
        ("upstream_oauth2_mechanism", "plain", "upstream.oauth2.mechanism: xoauth2|oauthbearer"),
        ("upstream_password", "pw", "upstream.password: not used with auth: oauth2"),
    ],
)
def test_config_names_the_bad_oauth2_key(
    provider: Provider, pki: Pki, tmp_path: Path, key: str, value: str, error: str
) -> None:
    """Each oauth2 mistake is a one-line ConfigError naming the key."""
    with pytest.raises(ConfigError) as info:
        oauth_cfg(provider, pki, tmp_path, **{key: value})
    assert error in str(info.value)
    assert "\n" not in str(info.value)


def test_client_credentials_for_microsoft_needs_a_tenant(tmp_path: Path) -> None:
    """flow client_credentials with provider microsoft and no tenant is refused, naming tenant."""
    secret = tmp_path / "secret"
    secret.write_text(CLIENT_SECRET)
    env = {
        "RELAYD_UPSTREAM_USERNAME": USER,
        "RELAYD_UPSTREAM_AUTH": "oauth2",
        "RELAYD_UPSTREAM_OAUTH2_PROVIDER": "microsoft",
        "RELAYD_UPSTREAM_OAUTH2_CLIENT_ID": "id",
        "RELAYD_UPSTREAM_OAUTH2_FLOW": "client_credentials",
        "RELAYD_UPSTREAM_OAUTH2_CLIENT_SECRET_FILE": str(secret),
    }
    with pytest.raises(ConfigError, match=r"^upstream\.oauth2\.tenant: required"):
        config_mod.load(None, env)


def test_presets_fill_endpoints_and_scopes() -> None:
    """google and microsoft presets give their endpoints and SMTP scopes; token_url overrides."""
    g = oauth.endpoints(OAuth2Config(provider="google"))
    assert (g.token_url, g.scope) == (
        "https://oauth2.googleapis.com/token",
        "https://mail.google.com/",
    )
    m = oauth.endpoints(OAuth2Config(provider="microsoft", tenant="contoso.com"))
    assert m.device_authorization_url.startswith("https://login.microsoftonline.com/contoso.com/")
    assert m.scope == "offline_access https://outlook.office.com/SMTP.Send"
    app = oauth.endpoints(OAuth2Config(provider="microsoft", tenant="t", flow="client_credentials"))
    assert app.scope == "https://outlook.office365.com/.default"
    custom = oauth.endpoints(OAuth2Config(provider="google", token_url="https://idp.test/t"))
    assert custom.token_url == "https://idp.test/t"


def test_reprs_carry_no_secret(provider: Provider, pki: Pki, tmp_path: Path) -> None:
    """The config record, a token and a TokenSource show no client secret or token."""
    cfg = oauth_cfg(provider, pki, tmp_path)
    token = oauth.Token("at-secret-in-repr", 1.0, 1.0, "s")
    text = repr(cfg) + repr(token) + repr(oauth.TokenSource(cfg, 5))
    assert CLIENT_SECRET not in text and "at-secret-in-repr" not in text


async def test_concurrent_sessions_share_one_refresh(
    provider: Provider, pki: Pki, tmp_path: Path
) -> None:
    """Twenty sessions asking at once for a token cause one request to the token endpoint."""
    source = oauth.TokenSource(oauth_cfg(provider, pki, tmp_path), 5)
    tokens = await asyncio.gather(*(source.token() for _ in range(20)))
    assert len(set(tokens)) == 1 and provider.valid(tokens[0])
    assert provider.refreshes == 1


async def test_refresh_ten_minutes_ahead_on_the_monotonic_clock(
    provider: Provider, pki: Pki, tmp_path: Path
) -> None:
    """A 3600 s token is reused until 600 s before its expires_in, then replaced."""
    clock = Clock()
    source = oauth.TokenSource(oauth_cfg(provider, pki, tmp_path), 5, clock=clock)
    first = await source.token()
    clock.now += 2999.0
    assert await source.token() == first
    assert provider.refreshes == 1
    clock.now += 2.0
    assert await source.token() != first
    assert provider.refreshes == 2


async def test_wall_clock_skew_does_not_age_a_token(
    provider: Provider, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wall clock two hours ahead leaves a fresh token in use: expiry is expires_in on the
    monotonic clock, never the server's or our idea of the date."""
    source = oauth.TokenSource(oauth_cfg(provider, pki, tmp_path), 5)
    first = await source.token()
    real = oauth.time.time
    monkeypatch.setattr(oauth.time, "time", lambda: real() + 7200)
    assert await source.token() == first
    assert provider.refreshes == 1


async def test_rotated_refresh_token_is_on_disk_0600_before_use(
    provider: Provider, pki: Pki, tmp_path: Path
) -> None:
    """A rotated refresh token replaces the file (mode 0600) before token() returns."""
    provider.rotate = True
    cfg = oauth_cfg(provider, pki, tmp_path)
    await oauth.TokenSource(cfg, 5).token()
    path = Path(cfg.refresh_token_file)
    on_disk = path.read_text()
    assert on_disk != FIRST_REFRESH and on_disk in provider.refresh_tokens
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


async def test_invalid_grant_is_reauth_with_a_fix_and_no_secret(
    provider: Provider, pki: Pki, tmp_path: Path
) -> None:
    """invalid_grant raises ReauthRequired naming `relayd oauth login`; it carries no secret,
    and the dead refresh token is not sent again."""
    provider.error = "invalid_grant"
    source = oauth.TokenSource(oauth_cfg(provider, pki, tmp_path), 5)
    with pytest.raises(oauth.ReauthRequired) as info:
        await source.token()
    assert "relayd oauth login default" in info.value.fix
    assert FIRST_REFRESH not in str(info.value) + info.value.fix
    assert CLIENT_SECRET not in str(info.value)
    with pytest.raises(oauth.ReauthRequired):
        await source.token()
    assert provider.refreshes == 1


async def test_a_new_refresh_token_file_ends_reauth(
    provider: Provider, pki: Pki, tmp_path: Path
) -> None:
    """After invalid_grant, a refresh token written by a new login is used without a restart."""
    cfg = oauth_cfg(provider, pki, tmp_path)
    provider.refresh_tokens.clear()
    source = oauth.TokenSource(cfg, 5)
    with pytest.raises(oauth.ReauthRequired):
        await source.token()
    provider.refresh_tokens.add("rt-from-a-new-login-77")
    oauth.write_secret_file(cfg.refresh_token_file, "rt-from-a-new-login-77")
    assert provider.valid(await source.token())


@pytest.mark.parametrize(
    ("error", "fix"), [("invalid_client", "client_id"), ("unauthorized_client", "public client")]
)
async def test_client_errors_are_reauth(
    provider: Provider, pki: Pki, tmp_path: Path, error: str, fix: str
) -> None:
    """invalid_client and unauthorized_client are ReauthRequired, each with its own fix."""
    provider.error = error
    with pytest.raises(oauth.ReauthRequired) as info:
        await oauth.TokenSource(oauth_cfg(provider, pki, tmp_path), 5).token()
    assert info.value.error == error
    assert fix in info.value.fix


async def test_503_is_temporary(provider: Provider, pki: Pki, tmp_path: Path) -> None:
    """A 503 from the token endpoint is TokenUnavailable (retry later), not reauth."""
    provider.status = 503
    with pytest.raises(oauth.TokenUnavailable):
        await oauth.TokenSource(oauth_cfg(provider, pki, tmp_path), 5).token()


async def test_connection_refused_is_temporary(
    provider: Provider, pki: Pki, tmp_path: Path
) -> None:
    """A token endpoint nobody listens on is TokenUnavailable."""
    cfg = oauth_cfg(
        provider, pki, tmp_path, upstream_oauth2_token_url=f"https://127.0.0.1:{free_port()}/t"
    )
    with pytest.raises(oauth.TokenUnavailable, match="unreachable"):
        await oauth.TokenSource(cfg, 5).token()


async def test_untrusted_certificate_is_refused(
    provider: Provider, tmp_path: Path, pki: Pki
) -> None:
    """Without the CA that signed the endpoint's certificate, no token request is made."""
    cfg = oauth_cfg(provider, pki, tmp_path, upstream_oauth2_ca_file="")
    with pytest.raises(oauth.TokenUnavailable):
        await oauth.TokenSource(cfg, 5).token()
    assert provider.grants == []


def test_secret_file_write_is_atomic_and_private(tmp_path: Path) -> None:
    """write_secret_file leaves a 0600 file and no temporary behind, replacing the old one."""
    path = tmp_path / "rt"
    path.write_text("old")
    os.chmod(path, 0o644)
    oauth.write_secret_file(str(path), "new")
    assert path.read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rt"]


def test_yaml_oauth2_mapping_with_a_secret_file(tmp_path: Path) -> None:
    """upstream.oauth2 as a YAML mapping; client_secret_file is read at load, kept out of repr,
    and the record survives the trip to the delivery process."""
    secret = tmp_path / "client-secret"
    secret.write_text(CLIENT_SECRET + "\n")
    path = tmp_path / "relayd.yaml"
    path.write_text(
        "upstream:\n  username: me@example.com\n  auth: oauth2\n  oauth2:\n"
        "    provider: microsoft\n    client_id: abc\n"
        f"    client_secret_file: {secret}\n    refresh_token_file: {tmp_path / 'rt'}\n"
    )
    cfg = config_mod.load(path, {})
    assert cfg.upstream.oauth2.client_secret == CLIENT_SECRET
    assert CLIENT_SECRET not in repr(cfg)
    assert config_mod.from_json(config_mod.to_json(cfg)) == cfg


@pytest.mark.parametrize(
    ("oauth2", "error"),
    [
        ("[1, 2]", "upstream.oauth2: must be a mapping"),
        ("{nope: 1}", "upstream.oauth2.nope: unknown key"),
    ],
)
def test_yaml_oauth2_errors_name_the_key(tmp_path: Path, oauth2: str, error: str) -> None:
    """A non-mapping oauth2 or an unknown key inside it is one line naming it."""
    path = tmp_path / "relayd.yaml"
    path.write_text(f"upstream:\n  oauth2: {oauth2}\n")
    with pytest.raises(ConfigError) as info:
        config_mod.load(path, {})
    assert str(info.value) == error
