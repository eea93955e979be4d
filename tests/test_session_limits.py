"""Idle connections cannot take the daemon down: a session cap, a command bound per session,
and housekeeping that survives running out of file descriptors.

Each test runs `relayd serve` under a low RLIMIT_NOFILE (as systemd's default 1,024, only
smaller) with a systemd notify socket and watchdog, so the watchdog ping runs as in production.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import eventually, message, submit
from proc import ServeProcess, serve_env
from rawsmtp import Wire

from relayd import config as config_mod
from relayd import eventloop

UNIT = Path(__file__).parent.parent / "systemd" / "relayd.service"


def nofile(limit: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return apply


async def greeted(port: int) -> bool:
    """Whether a new connection now gets the banner (the daemon has let the old ones go)."""
    wire = await Wire.open(port)
    try:
        return (await wire.reply(timeout=5))[0] == 220
    except TimeoutError:
        return False
    finally:
        wire.close()


def watchdogs(got: list[bytes]) -> int:
    return sum(b"WATCHDOG=1" in d for d in got)


async def first_reply(port: int, held: list[Wire]) -> tuple[int, str]:
    """Connect and read the banner (or refusal); keeps the connection open in held."""
    wire = await Wire.open(port)
    held.append(wire)
    try:
        return await wire.reply(timeout=5)
    except TimeoutError:
        return -1, "no banner in 5 s"


async def start(tmp_path, pki, sink, limit: int, notify: str, **extra: str) -> ServeProcess:
    env = serve_env(tmp_path / "spool", sink.port, pki.ca_file, **extra)
    env.update(NOTIFY_SOCKET=notify, WATCHDOG_USEC="1000000")  # a ping every 0.5 s
    return await ServeProcess(env, preexec=nofile(limit)).start()


@pytest.fixture
async def notify(tmp_path):
    with tempfile.TemporaryDirectory(prefix="nfy") as d:
        path = str(Path(d) / "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.setblocking(False)
        got: list[bytes] = []
        loop = asyncio.get_running_loop()

        async def drain() -> None:
            while True:
                got.append(await loop.sock_recv(sock, 4096))

        task = asyncio.create_task(drain())
        try:
            yield path, got
        finally:
            task.cancel()
            sock.close()


async def test_connections_beyond_max_sessions_get_421_and_the_daemon_goes_on(
    tmp_path, pki, sink, notify
):
    """250 idle clients against the default cap (100) under a 160-descriptor limit: 100 get
    the banner, the others `421 4.7.0 Too many connections` and are closed; no traceback; the
    watchdog keeps being pinged; once they close, a message is accepted and delivered."""
    path, got = notify
    proc = await start(tmp_path, pki, sink, 160, path)
    held: list[Wire] = []
    try:
        replies = [await first_reply(proc.port, held) for _ in range(250)]
        codes = [code for code, _ in replies]
        assert codes.count(220) == 100, sorted(set(codes))
        refused = [text for code, text in replies if code == 421]
        assert len(refused) == 150 and all(t.startswith("4.7.0 Too many") for t in refused), (
            replies[100:103]
        )
        pings = watchdogs(got)
        await eventually(lambda: watchdogs(got) > pings + 2, what="watchdog pings go on")
        for wire in held:
            wire.close()
        held.clear()
        await eventually(lambda: greeted(proc.port), what="a session slot free again")
        reply = await submit(proc.port, "app@example.com", ["u@example.org"], message("after"))
        assert reply[0] == 250, reply
        await eventually(lambda: sink.messages, what="delivery after the flood")
        assert proc.proc is not None and proc.proc.returncode is None
        assert not [line for line in proc.raw if "Traceback" in line]
        busy = proc.events("client.refused_busy")
        assert 1 <= len(busy) <= 5, len(busy)  # logged, but not once per connection
    finally:
        for wire in held:
            wire.close()
        assert await proc.stop() == 0


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_running_out_of_descriptors_is_logged_once_and_survived(
    tmp_path, pki, sink, notify, loop
):
    """max_sessions above what a 64-descriptor limit allows: accept() and the watchdog ping
    fail with EMFILE; each is logged (no traceback flood), the daemon stays up, and delivers
    once the idle clients are gone. (asyncio reports every failed accept(), thousands a
    second; uvloop's libuv closes such connections itself and reports nothing.)"""
    if loop == "uvloop" and not eventloop.available():
        pytest.skip("uvloop is not installed")
    path, got = notify
    proc = await start(tmp_path, pki, sink, 64, path, relay_event_loop=loop)
    held: list[Wire] = []
    try:
        for _ in range(120):  # the kernel completes the handshakes; relayd cannot accept all
            held.append(await Wire.open(proc.port))
        if loop == "asyncio":
            await eventually(
                lambda: proc.events("server.accept_failed"), what="accept failure logged"
            )
        await eventually(
            lambda: proc.events("housekeeping.failed"), what="watchdog ping failure logged"
        )
        assert proc.proc is not None and proc.proc.returncode is None
        for wire in held:
            wire.close()
        held.clear()
        pings = watchdogs(got)
        await eventually(lambda: watchdogs(got) > pings, what="watchdog pings resume")
        await eventually(lambda: greeted(proc.port), what="connections accepted again")
        reply = await submit(proc.port, "app@example.com", ["u@example.org"], message("after"))
        assert reply[0] == 250, reply
        await eventually(lambda: sink.messages, what="delivery after the exhaustion")
        assert not [line for line in proc.raw if "Traceback" in line]
        assert len(proc.events("server.accept_failed")) <= 5
        assert len(proc.events("housekeeping.failed")) <= 3
    finally:
        for wire in held:
            wire.close()
        assert await proc.stop() == 0


async def test_a_session_sending_endless_commands_is_cut_off(tmp_path, pki, sink, notify):
    """A client that only sends NOOPs keeps a session slot only so long: after 1,000 of one
    command the session gets `421 4.7.0` and is closed."""
    path, _ = notify
    proc = await start(tmp_path, pki, sink, 1024, path)
    wire = await Wire.open(proc.port)
    try:
        await wire.greet()
        wire.writer.write(b"NOOP\r\n" * 1001)
        await wire.writer.drain()
        replies = [await wire.reply() for _ in range(1001)]
        assert [c for c, _ in replies[:1000]] == [250] * 1000
        assert replies[1000][0] == 421 and replies[1000][1].startswith("4.7.0"), replies[1000]
        assert await wire.reply() == (0, "")  # closed
    finally:
        wire.close()
        assert await proc.stop() == 0


def test_the_unit_allows_many_more_descriptors_than_sessions():
    """systemd/relayd.service sets LimitNOFILE= well above the default listen.max_sessions
    (one descriptor per session, plus upstream sessions and the spool's)."""
    limits = [
        int(line.split("=", 1)[1])
        for line in UNIT.read_text().splitlines()
        if line.startswith("LimitNOFILE=")
    ]
    assert len(limits) == 1
    assert limits[0] >= 10 * config_mod.load(None, {}).listen.max_sessions
