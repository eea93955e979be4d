"""relayd under systemd: the notify protocol played for real, and the unit file checked."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import eventually, free_port
from proc import ServeProcess, serve_env

UNIT = Path(__file__).parent.parent / "systemd" / "relayd.service"


class Manager:
    """Plays systemd's side of sd_notify(3): an AF_UNIX datagram socket and what arrived."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []
        self.accepted_at_ready: bool | None = None

    async def collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            text = (await loop.sock_recv(self.sock, 4096)).decode()
            if "READY=1" in text.splitlines() and self.accepted_at_ready is None:
                self.accepted_at_ready = _accepts(text)
            self.messages.append(text)

    def count(self, field: str) -> int:
        return sum(field in m.splitlines() for m in self.messages)


def _accepts(ready: str) -> bool:
    """Connect to the port named in READY's STATUS= line, the moment READY arrives."""
    status = next(f for f in ready.splitlines() if f.startswith("STATUS=listening on "))
    port = int(status.split(",")[0].rsplit(":", 1)[1])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


@contextlib.asynccontextmanager
async def manager(tmp_path: Path) -> AsyncIterator[Manager]:
    m = Manager(tmp_path / "notify.sock")
    task = asyncio.create_task(m.collect())
    try:
        yield m
    finally:
        task.cancel()
        m.sock.close()


async def test_ready_after_listener_accepts_then_watchdog_then_stopping(tmp_path, pki):
    """READY=1 only once the port accepts; WATCHDOG=1 keeps coming; STOPPING=1 on SIGTERM."""
    async with manager(tmp_path) as m:
        env = serve_env(tmp_path / "spool", free_port(), pki.ca_file)
        env.update(NOTIFY_SOCKET=str(m.path), WATCHDOG_USEC="400000")
        env["WATCHDOG_PID"] = ""  # set, it would have to be the child's pid
        proc = await ServeProcess(env).start()
        try:
            await eventually(lambda: m.count("READY=1"), what="READY=1")
            assert m.accepted_at_ready is True
            await eventually(lambda: m.count("WATCHDOG=1") >= 4, timeout=10, what="watchdogs")
            assert m.messages.index(next(x for x in m.messages if "READY=1" in x)) == 0
            proc.signal(signal.SIGTERM)
            assert await proc.wait() == 0
            await eventually(lambda: m.count("STOPPING=1"), what="STOPPING=1")
        finally:
            await proc.stop()


async def test_no_watchdog_pings_without_watchdog_usec(tmp_path, pki):
    """Without WATCHDOG_USEC the daemon sends READY and STATUS, but never WATCHDOG=1."""
    async with manager(tmp_path) as m:
        env = serve_env(tmp_path / "spool", free_port(), pki.ca_file)
        env["NOTIFY_SOCKET"] = str(m.path)
        env["WATCHDOG_USEC"] = ""
        proc = await ServeProcess(env).start()
        try:
            await eventually(lambda: m.count("READY=1"), what="READY=1")
            # A housekeeping round has run once STATUS=<n> queued has arrived.
            await eventually(lambda: any("queued, " in x for x in m.messages[1:]), what="STATUS")
            assert m.count("WATCHDOG=1") == 0
        finally:
            assert await proc.stop() == 0


async def test_sighup_is_announced_as_reloading_then_ready(tmp_path, pki):
    """SIGHUP: RELOADING=1 with MONOTONIC_USEC, then READY=1 again once the config is read."""
    async with manager(tmp_path) as m:
        env = serve_env(tmp_path / "spool", free_port(), pki.ca_file)
        env["NOTIFY_SOCKET"] = str(m.path)
        proc = await ServeProcess(env).start()
        try:
            await eventually(lambda: m.count("READY=1"), what="READY=1")
            proc.signal(signal.SIGHUP)
            await eventually(lambda: m.count("READY=1") >= 2, what="READY=1 after reload")
            reloading = next(x for x in m.messages if "RELOADING=1" in x.splitlines())
            assert "MONOTONIC_USEC=" in reloading
            await eventually(lambda: proc.events("config.reloaded"), what="config.reloaded")
        finally:
            assert await proc.stop() == 0


def test_unit_has_the_promised_settings():
    """The unit is Type=notify with a watchdog, a state dir, hardening, no restart on 78."""
    lines = set(UNIT.read_text().splitlines())
    for line in (
        "Type=notify",
        "NotifyAccess=main",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "StateDirectory=relayd",
        "ConfigurationDirectory=relayd",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "Restart=on-failure",
        "RestartPreventExitStatus=78",
    ):
        assert line in lines, line
    assert any(x.startswith("WatchdogSec=") for x in lines)
    assert any(x.startswith("ExecStart=/usr/local/bin/relayd serve") for x in lines)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze absent")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    """`systemd-analyze verify` accepts the unit (ExecStart pointed at this interpreter)."""
    text = UNIT.read_text().replace("/usr/local/bin/relayd", f"{sys.executable} -m relayd")
    unit = tmp_path / "relayd.service"
    unit.write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "relayd.service" not in result.stderr, result.stderr
