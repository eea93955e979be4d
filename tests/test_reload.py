"""SIGHUP re-reads the config: new credentials for the next session, a bad file is refused."""

from __future__ import annotations

import signal

import aiosmtplib
from conftest import eventually, message, submit
from proc import ServeProcess, serve_env

NEW_PASSWORD = "rotated-Pa55word!"


def _env(tmp_path, pki, sink, config_text: str = "log: {level: info}\n"):
    """serve_env with the password in a file and a --config file, both editable by the test."""
    secret = tmp_path / "password"
    secret.write_text(sink.password + "\n")
    config = tmp_path / "relayd.yaml"
    config.write_text(config_text)
    env = serve_env(
        tmp_path / "spool",
        sink.port,
        pki.ca_file,
        upstream_password_file=str(secret),
        upstream_max_connections="1",  # one worker: its idle session would be reused
    )
    env["RELAYD_UPSTREAM_PASSWORD"] = ""  # the file is the only source of the password
    return env, secret, config


async def _send(proc: ServeProcess, sink, subject: str) -> None:
    before = len(sink.messages)
    code, _ = await submit(proc.port, "app@example.com", ["u@example.org"], message(subject))
    assert code == 250
    await eventually(lambda: len(sink.messages) > before, what=f"delivery of {subject}")


async def test_rotated_password_is_used_by_the_next_delivery(tmp_path, pki, sink):
    """After the provider and the password file change and SIGHUP, the next message logs in
    afresh with the new password (the idle session is not reused) and no AUTH fails."""
    env, secret, config = _env(tmp_path, pki, sink)
    proc = await ServeProcess(env, ["--config", str(config)]).start()
    try:
        await _send(proc, sink, "before")
        assert len(sink.logins) == 1
        sink.password = NEW_PASSWORD
        secret.write_text(NEW_PASSWORD + "\n")
        proc.signal(signal.SIGHUP)
        await eventually(lambda: proc.events("config.reloaded"), what="config.reloaded")
        await _send(proc, sink, "after")
        assert len(sink.logins) == 2
        assert sink.auth_failures == 0
        assert sink.messages[-1].login == sink.logins[-1]
    finally:
        assert await proc.stop() == 0


async def test_broken_config_is_refused_and_the_old_one_keeps_working(tmp_path, pki, sink):
    """A config file broken before SIGHUP: config.reload_failed, and mail still flows."""
    env, _, config = _env(tmp_path, pki, sink)
    proc = await ServeProcess(env, ["--config", str(config)]).start()
    try:
        config.write_text("upstream: [this is not\n")
        proc.signal(signal.SIGHUP)
        failed = await eventually(lambda: proc.events("config.reload_failed"), what="refusal")
        assert "not valid YAML" in failed[0]["error"]
        assert proc.proc is not None and proc.proc.returncode is None
        await _send(proc, sink, "still-works")
        assert sink.auth_failures == 0
    finally:
        assert await proc.stop() == 0


async def test_missing_password_file_is_refused_on_reload(tmp_path, pki, sink):
    """A password file that vanished: the reload names upstream.password_file, nothing else
    changes, and the next delivery still authenticates with the password read at start."""
    env, secret, config = _env(tmp_path, pki, sink)
    proc = await ServeProcess(env, ["--config", str(config)]).start()
    try:
        secret.unlink()
        proc.signal(signal.SIGHUP)
        failed = await eventually(lambda: proc.events("config.reload_failed"), what="refusal")
        assert "upstream.password_file" in failed[0]["error"]
        await _send(proc, sink, "old-password")
        assert sink.auth_failures == 0
    finally:
        assert await proc.stop() == 0


async def test_reload_keeps_open_client_sessions_and_log_level(tmp_path, pki, sink):
    """An SMTP session open across SIGHUP still gets its 250; a new log level takes effect."""
    env, _, config = _env(tmp_path, pki, sink)
    del env["RELAYD_LOG_LEVEL"]  # the level must come from the file for the reload to change it
    proc = await ServeProcess(env, ["--config", str(config)]).start()
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=proc.port, start_tls=False, local_hostname="c.test"
    )
    try:
        await client.connect()
        await client.ehlo()
        config.write_text("log: {level: warning}\n")
        proc.signal(signal.SIGHUP)
        await eventually(lambda: proc.events("config.reloaded"), what="config.reloaded")
        await client.mail("app@example.com")
        await client.rcpt("u@example.org")
        reply = await client.data(message("across-reload"))
        assert reply.code == 250
        await eventually(lambda: sink.messages, what="delivery")
        await proc.stop()
        assert not proc.events("delivery.sent"), "info lines after reloading at warning"
    finally:
        client.close()
        assert await proc.stop() == 0
