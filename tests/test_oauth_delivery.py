"""OAuth end to end: `relayd serve` as a subprocess, a real TLS token endpoint, and a TLS SMTP
upstream that takes only XOAUTH2/OAUTHBEARER with a token the endpoint issued."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
from conftest import USER, Pki, eventually, message, submit
from oauthfake import FIRST_REFRESH, OAuthSink, Provider, oauth_settings, start_oauth_sink
from proc import ServeProcess, serve_env


@pytest.fixture
async def provider(pki: Pki):
    p = await Provider(pki.server_ctx).start()
    yield p
    await p.stop()


@pytest.fixture
async def osink(pki: Pki, provider: Provider):
    sink = await start_oauth_sink(OAuthSink(provider=provider), pki.server_ctx)
    yield sink
    if sink.server is not None:
        sink.server.close()


def env_for(tmp_path: Path, pki: Pki, provider: Provider, sink: OAuthSink, **extra: str):
    settings = oauth_settings(provider, pki.ca_file, tmp_path / "refresh-token", **extra)
    return serve_env(tmp_path / "spool", sink.port, pki.ca_file, **settings)


async def relayd_health(spool: Path, *args: str) -> str:
    """`relayd health` output once it mentions a failed attempt, else ''."""
    done = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relayd", "health", *args,
        env={**os.environ, "RELAYD_SPOOL_PATH": str(spool)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await done.communicate()
    text = out.decode()
    return text if "failed attempts" in text else ""


def spooled(tmp_path: Path, state: str) -> list[str]:
    d = tmp_path / "spool" / state
    return [p.name for p in d.iterdir() if p.suffix == ".eml"] if d.exists() else []


async def test_first_login_delivers_through_serve(
    tmp_path: Path, pki: Pki, provider, osink
) -> None:
    """With auth: oauth2 the first message is delivered after one refresh, logged in as the
    configured mailbox over XOAUTH2."""
    proc = await ServeProcess(env_for(tmp_path, pki, provider, osink)).start()
    try:
        assert (await submit(proc.port, USER, ["u@example.org"], message("first")))[0] == 250
        await eventually(lambda: osink.messages, what="the message upstream")
        assert osink.bearer_users == [USER]
        assert provider.refreshes == 1
        assert osink.bad_strings == 0
    finally:
        await proc.stop()


async def test_token_expiring_mid_burst_is_refreshed_once(
    tmp_path: Path, pki: Pki, provider, osink
) -> None:
    """When the provider ends the access token in the middle of a burst over four sessions,
    every session is refused once, one refresh serves them all, and nothing is lost."""
    env = env_for(tmp_path, pki, provider, osink, upstream_max_messages_per_session="1")
    proc = await ServeProcess(env).start()
    try:
        for i in range(4):
            await submit(proc.port, USER, ["u@example.org"], message(f"before{i}"))
        await eventually(lambda: len(osink.messages) == 4, what="the first four")
        provider.expire_all()
        replies = await asyncio.gather(
            *(submit(proc.port, USER, ["u@example.org"], message(f"m{i}")) for i in range(24))
        )
        assert all(code == 250 for code, _ in replies)
        await eventually(lambda: len(osink.messages) == 28, timeout=30, what="all 28 upstream")
        assert osink.refused_tokens >= 1
        assert provider.refreshes == 2  # the first token, and one renewal for the whole burst
        assert spooled(tmp_path, "failed") == []
    finally:
        await proc.stop()


async def test_rotated_refresh_token_survives_kill_9(
    tmp_path: Path, pki: Pki, provider, osink
) -> None:
    """A daemon killed -9 right after a refresh that rotated the refresh token comes back with
    the new one from disk (the provider has retired the old one) and delivers."""
    provider.rotate = True
    env = env_for(tmp_path, pki, provider, osink)
    token_file = tmp_path / "refresh-token"
    first = await ServeProcess(env).start()
    await submit(first.port, USER, ["u@example.org"], message("before"))
    await eventually(lambda: token_file.read_text().strip() != FIRST_REFRESH, what="rotation")
    await first.kill9()
    rotated = token_file.read_text().strip()
    assert rotated in provider.refresh_tokens and FIRST_REFRESH not in provider.refresh_tokens
    second = await ServeProcess(env).start()
    try:
        await submit(second.port, USER, ["u@example.org"], message("after"))
        await eventually(
            lambda: any(b"Subject: after" in m.data for m in osink.messages), what="after"
        )
        assert any(b"Subject: before" in m.data for m in osink.messages)
        assert provider.refreshes == 2
        assert not second.events("upstream.auth_failed")
    finally:
        await second.stop()


async def test_invalid_grant_keeps_mail_queued_and_says_the_fix(
    tmp_path: Path, pki: Pki, provider, osink
) -> None:
    """invalid_grant defers (nothing in failed/), logs an error naming `relayd oauth login`,
    and a new refresh token on disk resumes delivery without a restart."""
    provider.error = "invalid_grant"
    proc = await ServeProcess(env_for(tmp_path, pki, provider, osink)).start()
    try:
        await submit(proc.port, USER, ["u@example.org"], message("waits"))
        lines = await eventually(lambda: proc.events("upstream.auth_failed"), what="auth_failed")
        assert lines[0]["level"] == "error"
        assert "relayd oauth login default" in lines[0]["hint"]
        assert len(spooled(tmp_path, "queue")) == 1
        assert spooled(tmp_path, "failed") == [] and osink.messages == []
        health = await eventually(
            lambda: relayd_health(tmp_path / "spool", "--max-failures", "1"), what="health"
        )
        assert "fix: " in health and "relayd oauth login default" in health
        provider.error = ""
        provider.refresh_tokens.add("rt-after-login-555")
        (tmp_path / "refresh-token").write_text("rt-after-login-555\n")
        await eventually(lambda: osink.messages, timeout=15, what="delivery after the new login")
    finally:
        await proc.stop()


async def test_token_endpoint_down_then_back_loses_nothing(
    tmp_path: Path, pki: Pki, provider, osink
) -> None:
    """While the token endpoint answers 503, then refuses connections, mail is deferred at
    step token; once it is back every message is delivered exactly once and none failed."""
    provider.status = 503
    proc = await ServeProcess(env_for(tmp_path, pki, provider, osink)).start()

    def deferrals() -> int:
        return len([e for e in proc.events("delivery.deferred") if e.get("step") == "token"])

    try:
        for i in range(3):
            assert (await submit(proc.port, USER, ["u@example.org"], message(f"d{i}")))[0] == 250
        await eventually(lambda: deferrals() and provider.grants, what="a deferral on 503")
        await provider.stop()
        seen = deferrals()
        await eventually(lambda: deferrals() > seen, what="a deferral while refused")
        provider.status = 0
        await provider.start()
        await eventually(lambda: len(osink.messages) >= 3, timeout=20, what="all three")
        subjects = sorted(m.data.split(b"Subject: ")[1].split(b"\r\n")[0] for m in osink.messages)
        assert subjects == [b"d0", b"d1", b"d2"]
        assert spooled(tmp_path, "failed") == []
    finally:
        await proc.stop()


async def test_oauthbearer_is_used_when_it_is_the_only_one_offered(
    tmp_path: Path, pki: Pki, provider
) -> None:
    """Configured for XOAUTH2, relayd logs in with OAUTHBEARER on a server offering only it."""
    sink = await start_oauth_sink(OAuthSink(provider=provider), pki.server_ctx, ("OAUTHBEARER",))
    proc = await ServeProcess(env_for(tmp_path, pki, provider, sink)).start()
    try:
        await submit(proc.port, USER, ["u@example.org"], message("bearer"))
        await eventually(lambda: sink.messages, what="the message upstream")
        assert sink.bearer_users == [USER] and sink.bad_strings == 0
    finally:
        await proc.stop()
        sink.server.close()


async def relayd_check(env: dict[str, str]) -> tuple[int, str]:
    done = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relayd", "check",
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await done.communicate()
    return int(done.returncode or 0), out.decode()


async def test_check_logs_in_with_a_token(tmp_path: Path, pki: Pki, provider, osink) -> None:
    """`relayd check` shows the OAuth login step (mechanism and reply), never the token."""
    code, out = await relayd_check(env_for(tmp_path, pki, provider, osink))
    assert code == 0, out
    assert "XOAUTH2 (offered: OAUTHBEARER XOAUTH2): 235" in out
    assert not [s for s in provider.issued if s in out]


async def test_check_on_invalid_grant_prints_the_fix(
    tmp_path: Path, pki: Pki, provider, osink
) -> None:
    """`relayd check` with a revoked refresh token fails at auth and says to log in again."""
    provider.error = "invalid_grant"
    code, out = await relayd_check(env_for(tmp_path, pki, provider, osink))
    assert code == 1
    assert "failed at auth" in out and "hint: " in out and "relayd oauth login default" in out


async def test_invalid_grant_puts_the_upstream_in_reauth_and_fails_over(
    tmp_path: Path, pki: Pki, provider, osink
) -> None:
    """Two upstreams, the first with a revoked grant: it is in reauth (health --json), the
    message goes out through the second within the first attempt."""
    import json

    import yaml
    from conftest import PASSWORD, Sink, start_sink, stop_sink

    provider.error = "invalid_grant"
    flat = oauth_settings(provider, pki.ca_file, tmp_path / "refresh-token")
    oauth2 = {k.removeprefix("upstream_oauth2_"): v for k, v in flat.items() if "oauth2_" in k}
    common = {"host": "127.0.0.1", "ca_file": str(pki.ca_file), "username": USER, "timeout": 5}
    backup = await start_sink(Sink(), pki.server_ctx)
    doc = {
        "upstreams": [
            {"name": "m365", **common, "port": osink.port, "auth": "oauth2", "oauth2": oauth2},
            {"name": "backup", **common, "port": backup.port, "password": PASSWORD},
        ],
        "retry": {"initial_delay": 60, "max_delay": 120},
    }
    path = tmp_path / "relayd.yaml"
    path.write_text(yaml.safe_dump(doc))
    env = {"RELAYD_LISTEN_PORT": "0", "RELAYD_SPOOL_PATH": str(tmp_path / "spool")}
    proc = await ServeProcess(env, ["--config", str(path)]).start()
    try:
        await submit(proc.port, USER, ["u@example.org"], message("over"))
        await eventually(lambda: backup.messages, what="delivery through backup")
        # The sink has the message a moment before the daemon logs its 250.
        sent = await eventually(lambda: proc.events("delivery.sent"), what="delivery.sent")
        assert sent[0]["attempt"] == 1 and sent[0]["upstream"] == "backup"
        changes = proc.events("upstream.state_changed")
        assert [(c["upstream"], c["state"], c["level"]) for c in changes] == [
            ("m365", "reauth", "error")
        ]

        async def reauth() -> dict[str, object] | None:
            done = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relayd", "health", "--json",
                env={**os.environ, **env}, stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, _ = await done.communicate()
            doc = json.loads(out)
            ups = {u["name"]: u for u in doc["status"]["upstreams"]} if doc["status"] else {}
            return doc if ups.get("m365", {}).get("state") == "reauth" else None

        doc = await eventually(reauth, what="m365 in reauth in health --json")
        assert "upstream m365 reauth" in str(doc["line"])
        failed = proc.events("upstream.auth_failed")
        assert failed and "relayd oauth login m365" in failed[0]["hint"]
        assert osink.messages == [] and spooled(tmp_path, "failed") == []
    finally:
        await proc.stop()
        await stop_sink(backup)
