"""The daemon as operators run it: a `relayd serve` subprocess, killed and restarted."""

from __future__ import annotations

import signal

import pytest
from conftest import (
    Sink,
    eventually,
    free_port,
    message,
    start_sink,
    stop_sink,
    submit,
    taken_port,
)
from proc import ServeProcess, alive, serve_env

from relayd import eventloop


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


@pytest.mark.parametrize("loop", ["asyncio", "auto"])
async def test_dev_mode_writes_to_outbox_and_says_so(tmp_path, loop):
    """`relayd serve --dev` needs no provider: mail lands in <spool>/outbox/, on either loop."""
    spool = tmp_path / "spool"
    proc = await ServeProcess(
        {
            "RELAYD_SPOOL_PATH": str(spool),
            "RELAYD_LISTEN_PORT": "0",
            "RELAYD_RELAY_EVENT_LOOP": loop,
        },
        ["--dev"],
    ).start()
    try:
        assert proc.events("dev_mode"), "dev mode must announce itself"
        expected = "uvloop" if loop == "auto" and eventloop.available() else "asyncio"
        assert proc.events("server.started")[0]["event_loop"] == expected
        code, _ = await submit(proc.port, "app@example.com", ["u@example.org"], message("dev"))
        assert code == 250
        files = await eventually(lambda: list((spool / "outbox").glob("*.eml")))
        written = files[0].read_bytes()
        assert written.endswith(message("dev")) and b"X-Relayd-Envelope" not in written
    finally:
        assert await proc.stop() == 0


async def test_port_in_use_is_one_line_and_leaves_no_process(tmp_path, pki):
    """Listen port taken: exit 1 with one line naming the address; no delivery process left."""
    with taken_port() as port:
        env = serve_env(tmp_path / "spool", free_port(), pki.ca_file, listen_port=str(port))
        proc = ServeProcess(env)
        code = await proc.expect_exit()
    assert code == 1
    plain = [line for line in proc.raw if not line.startswith("{")]
    assert plain == [f"relayd: cannot listen on 127.0.0.1:{port}: Address already in use"]
    for event in proc.events("worker.started"):
        await eventually(lambda pid=event["pid"]: not alive(pid), what="the worker to exit")
