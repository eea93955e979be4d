"""The daemon as operators run it: a `relayd serve` subprocess, killed and restarted."""

from __future__ import annotations

import os
import signal

from conftest import Sink, eventually, free_port, message, start_sink, stop_sink, submit
from proc import ServeProcess, serve_env


async def test_kill_9_loses_nothing_that_got_250(tmp_path, pki):
    """Queue while the upstream is down, kill -9, restart, upstream up: all delivered."""
    port = free_port()
    env = serve_env(tmp_path / "spool", port, pki.ca_file)
    first = await ServeProcess(env).start()
    subjects = [f"m{i}" for i in range(5)]
    for s in subjects:
        code, _ = await submit(first.port, "app@example.com", ["u@example.org"], message(s))
        assert code == 250
    await first.kill9()
    second = await ServeProcess(env).start()
    assert second.events("server.started")[0]["queued"] == 5
    sink = await start_sink(Sink(), pki.server_ctx, port=port)
    try:
        await eventually(lambda: len(sink.messages) >= 5, timeout=30, what="5 deliveries")
        got = sorted(
            m.data.split(b"Subject: ")[1].split(b"\r\n")[0].decode() for m in sink.messages
        )
        assert got == subjects
    finally:
        assert await second.stop() == 0
        await stop_sink(sink)
    assert second.events("server.stopped")


async def test_sigterm_stops_cleanly_with_exit_0(tmp_path, pki):
    """SIGTERM: stop accepting, finish, exit 0, log server.stopped."""
    env = serve_env(tmp_path / "spool", free_port(), pki.ca_file)
    proc = await ServeProcess(env).start()
    proc.signal(signal.SIGTERM)
    assert await proc.wait() == 0
    assert proc.events("server.stopped")


async def test_dev_mode_writes_to_outbox_and_says_so(tmp_path):
    """`relayd serve --dev` needs no provider: mail lands in <spool>/outbox/."""
    spool = tmp_path / "spool"
    proc = await ServeProcess(
        {"RELAYD_SPOOL_PATH": str(spool), "RELAYD_LISTEN_PORT": "0"}, ["--dev"]
    ).start()
    try:
        assert proc.events("dev_mode"), "dev mode must announce itself"
        code, _ = await submit(proc.port, "app@example.com", ["u@example.org"], message("dev"))
        assert code == 250
        files = await eventually(lambda: list((spool / "outbox").glob("*.eml")))
        assert b"Subject: dev" in files[0].read_bytes()
    finally:
        assert await proc.stop() == 0


async def test_port_in_use_is_one_line_and_leaves_no_process(tmp_path, pki):
    """Listen port taken: exit 1 with one line naming the address; no delivery process left."""
    import asyncio
    import socket
    import sys

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {
            **serve_env(tmp_path / "spool", free_port(), pki.ca_file),
            "RELAYD_LISTEN_PORT": str(port),
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relayd",
            "serve",
            env={**os.environ, **env},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    lines = [ln for ln in err.decode().splitlines() if not ln.startswith("{")]
    assert proc.returncode == 1
    assert lines == [f"relayd: cannot listen on 127.0.0.1:{port}: Address already in use"]
    assert "Traceback" not in err.decode()
    worker = [
        e
        for e in map(_json_or_none, err.decode().splitlines())
        if e and e.get("event") == "worker.started"
    ]
    for event in worker:
        await eventually(lambda pid=event["pid"]: not _alive(pid), what="worker gone")


def _json_or_none(line: str):
    import json

    try:
        return json.loads(line)
    except ValueError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split()[2] != "Z"
