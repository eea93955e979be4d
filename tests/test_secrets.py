"""Secrets: at log level debug, across a representative run of the fault suite, neither the
upstream password, its base64 AUTH forms, nor a submitter's password appears anywhere relayd
writes: log lines (its own and its libraries'), spooled errors, reprs, or CLI output."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import aiosmtplib
import pytest
import structlog
from conftest import (
    SECRET_FORMS,
    SUBMITTER,
    SUBMITTER_PASSWORD,
    eventually,
    forms,
    make_config,
    message,
    running,
)
from faults import FaultServer
from proc import ServeProcess, serve_env

from relayd import auth, logs
from relayd.upstream import Session

WRONG_SUBMITTER_PASSWORD = "typo-subm1tter-Secret"
FAULTS = [
    ("auth_535", 1),
    ("reset_in_handshake", 1),
    ("cert_unknown_ca", 1),
    ("banner_421", 1),
    ("data_drop", 1),
    ("data_hang", 1),
    ("data_451", 1),
]


SECRETS = [*SECRET_FORMS, *forms(SUBMITTER, WRONG_SUBMITTER_PASSWORD)]


def leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


async def submit_as(port: int, password: str) -> int:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10)
    await client.connect()
    try:
        await client.ehlo()
        await client.login(SUBMITTER, password)
        await client.sendmail("app@example.com", ["u@example.org"], message())
        return 250
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code
    finally:
        client.close()


def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    path.write_text(f"{SUBMITTER}:{auth.hash_password(SUBMITTER_PASSWORD)}\n")
    return path


@pytest.fixture
def debug_output():
    """relayd's own log set-up at debug into a buffer; restored afterwards."""
    buf = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    logs.setup("json", "debug", stream=buf)
    yield buf
    structlog.reset_defaults()
    root.handlers[:], root.level = saved


async def run_faults(fs: FaultServer, port: int, spool: Path) -> None:
    """One message per fault, each delivered once its fault has cleared."""
    for n, (fault, times) in enumerate(FAULTS, 1):
        fs.fail(fault, times=times)
        assert await submit_as(port, SUBMITTER_PASSWORD) == 250
        await eventually(lambda n=n: len(fs.messages) >= n, timeout=20, what=f"after {fault}")
    assert await submit_as(port, WRONG_SUBMITTER_PASSWORD) == 535
    fs.auth_mechanisms = "LOGIN"  # the other base64 form
    assert await submit_as(port, SUBMITTER_PASSWORD) == 250
    await eventually(lambda: len(fs.messages) > len(FAULTS), timeout=20, what="LOGIN delivery")


async def test_no_secret_in_debug_logs_errors_or_reprs_in_process(tmp_path, pki, debug_output):
    """In-process daemon at debug, no redaction registered: nothing to redact ever appears."""
    async with FaultServer(pki) as fs:
        cfg = make_config(
            tmp_path,
            fs.port,
            pki.ca_file,
            upstream_timeout="1",
            log_level="debug",
            listen_users_file=str(users_file(tmp_path)),
        )
        async with running(cfg) as d:
            await run_faults(fs, d.address[1], Path(cfg.spool.path))
    written = debug_output.getvalue()
    assert '"level": "debug"' in written or "delivery.sent" in written
    spooled = "".join(
        p.read_text(errors="replace")
        for ext in ("json", "eml")
        for p in Path(cfg.spool.path).rglob(f"*.{ext}")
    )
    reprs = repr(cfg) + repr(Session(cfg.upstream, "localhost")) + str(cfg)
    assert leaks(written) == []
    assert leaks(spooled) == []
    assert leaks(reprs) == []


async def test_no_secret_in_a_debug_daemon_stderr_or_cli_output(tmp_path, pki):
    """`relayd serve` at debug through the same faults; then the CLI: stderr/stdout are clean."""
    async with FaultServer(pki) as fs:
        env = serve_env(
            tmp_path / "spool",
            fs.port,
            pki.ca_file,
            upstream_timeout="1",
            log_level="debug",
            listen_users_file=str(users_file(tmp_path)),
        )
        proc = await ServeProcess(env).start()
        try:
            await run_faults(fs, proc.port, tmp_path / "spool")
        finally:
            assert await proc.stop() == 0
    assert any(line.get("event") == "client.auth_failed" for line in proc.lines)
    assert leaks("\n".join(proc.raw)) == []
    outputs = []
    for args in (["queue", "list", "--json"], ["--help"], ["serve", "--bogus"]):
        done = subprocess.run(
            [sys.executable, "-m", "relayd", *args],
            env={**proc.env, "RELAYD_UPSTREAM_PORT": "1"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        outputs.append(done.stdout + done.stderr)
    assert leaks("\n".join(outputs)) == []
    assert json.loads(outputs[0]) == [] or isinstance(json.loads(outputs[0]), list)
