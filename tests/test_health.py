"""`relayd health`: one line and exit 0/1, from the lock, status.json and a write in tmp/."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from conftest import eventually, free_port, message, submit
from proc import ServeProcess, serve_env

from relayd.cli import health
from relayd.spool import Spool


async def relayd_health(spool, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relayd",
        "health",
        *args,
        env={**os.environ, "RELAYD_SPOOL_PATH": str(spool)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_healthy_daemon_exits_0_and_strict_fails_on_upstream_trouble(tmp_path, pki):
    """Upstream down: plain `health` still exits 0 and reports the error; --strict exits 1."""
    spool = tmp_path / "spool"
    proc = await ServeProcess(serve_env(spool, free_port(), pki.ca_file)).start()
    try:
        code, _ = await submit(proc.port, "app@example.com", ["u@example.org"], message("h"))
        assert code == 250

        def failures() -> int:
            doc = json.loads((spool / health.STATUS_FILE).read_text())
            return int(doc["consecutive_failures"])

        await eventually(lambda: failures() >= 2, what="failures in status.json")
        code, out, err = await relayd_health(spool)
        assert code == 0, out + err
        assert out.startswith("relayd: healthy") and out.count("\n") == 1
        assert "1 queued" in out and "at connect" in out
        code, out, _ = await relayd_health(spool, "--strict", "--max-failures", "2")
        assert code == 1
        assert out.startswith("relayd: upstream trouble:")
    finally:
        assert await proc.stop() == 0


async def test_no_daemon_is_one_line_exit_1(tmp_path):
    """Nothing serving the spool: exit 1, one line saying so, no traceback."""
    Spool(tmp_path / "spool").create()
    code, out, err = await relayd_health(tmp_path / "spool")
    assert code == 1
    assert out.startswith("relayd: down: no relayd holds the lock")
    assert "Traceback" not in err and out.count("\n") == 1


def _locked_spool(tmp_path, updated_at: float) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.create()
    spool.lock()
    doc = {"pid": os.getpid(), "updated_at": updated_at, "queued": 0, "oldest_age": 0.0}
    (spool.root / health.STATUS_FILE).write_text(json.dumps(doc))
    return spool


def test_stale_status_means_a_stuck_loop(tmp_path):
    """Lock held but status.json not rewritten for a minute: unhealthy, loop stuck."""
    spool = _locked_spool(tmp_path, time.time() - 60)
    try:
        ok, line = health.check(spool.root)
    finally:
        spool.unlock()
    assert not ok
    assert "event loop stuck" in line


def test_unwritable_spool_is_unhealthy(tmp_path):
    """tmp/ that cannot take a file (here: not a directory) makes the check fail."""
    spool = _locked_spool(tmp_path, time.time())
    try:
        assert health.check(spool.root)[0]
        (spool.root / "tmp").rmdir()
        (spool.root / "tmp").write_text("not a directory")
        ok, line = health.check(spool.root)
    finally:
        spool.unlock()
    assert not ok
    assert "not writable" in line


def test_old_queue_fails_only_with_strict(tmp_path):
    """The oldest queued message past --max-age: reported always, a failure only if strict."""
    spool = _locked_spool(tmp_path, time.time())
    doc = json.loads((spool.root / health.STATUS_FILE).read_text())
    doc.update(queued=3, oldest_age=7200.0)
    (spool.root / health.STATUS_FILE).write_text(json.dumps(doc))
    try:
        relaxed = health.check(spool.root, strict=False, max_age=3600)
        strict = health.check(spool.root, strict=True, max_age=3600)
    finally:
        spool.unlock()
    assert relaxed[0] and "healthy (upstream trouble)" in relaxed[1]
    assert "3 queued (oldest 7200s)" in relaxed[1]
    assert not strict[0]
