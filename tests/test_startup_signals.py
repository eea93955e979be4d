"""A signal that arrives while the daemon starts (its pid already in relayd.lock, the queue
still being scanned) never kills it: it is acted on once the daemon is ready."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import pytest
from conftest import eventually, message, submit
from proc import ServeProcess, serve_env

from relayd.spool import Spool

QUEUED = 3000  # enough that the start-up scan takes a while


def seed(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """QUEUED messages due in an hour (the seed's durability does not matter: no fsync)."""
    spool.create()
    later = time.time() + 3600
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", lambda fd: None)
        for n in range(QUEUED):
            spool.put("app@example.com", ["u@example.org"], message(f"old-{n}"), later)


async def start_and_signal(proc: ServeProcess, spool: Spool, sig: int) -> int:
    """Start the daemon and send sig as soon as its pid is in relayd.lock; returns the pid."""
    starting = asyncio.create_task(proc.start(timeout=60))
    pid = await eventually(spool.daemon_pid, timeout=30, what="the pid in relayd.lock")
    os.kill(pid, sig)
    assert not starting.done(), "the daemon was ready before the signal: the test proves nothing"
    await starting
    return int(pid)


@pytest.mark.parametrize(
    "sig", [signal.SIGUSR2, signal.SIGUSR1, signal.SIGHUP], ids=lambda s: s.name
)
async def test_a_signal_during_start_up_does_not_kill_the_daemon(
    tmp_path, pki, sink, monkeypatch, sig
):
    """SIGUSR2/SIGUSR1/SIGHUP while the queue is scanned: the daemon starts and serves."""
    spool = Spool(tmp_path / "spool")
    seed(spool, monkeypatch)
    proc = ServeProcess(serve_env(spool.root, sink.port, pki.ca_file))
    try:
        await start_and_signal(proc, spool, sig)
        code, _ = await submit(proc.port, "app@example.com", ["u@example.org"], message("new"))
        assert code == 250
        await eventually(lambda: sink.messages, timeout=20, what="delivery after the signal")
        acted = {
            signal.SIGUSR2: "queue.rescanned",
            signal.SIGUSR1: "queue.flushed",
            signal.SIGHUP: "config.reloaded",
        }[sig]
        await eventually(lambda: proc.events(acted), what=f"{acted} once ready")
    finally:
        if proc.proc is not None:
            assert await proc.stop() == 0


async def test_sigterm_during_start_up_is_a_clean_stop_once_ready(tmp_path, pki, sink, monkeypatch):
    """SIGTERM while the queue is scanned: the daemon stops cleanly (exit 0, server.stopped)."""
    spool = Spool(tmp_path / "spool")
    seed(spool, monkeypatch)
    proc = ServeProcess(serve_env(spool.root, sink.port, pki.ca_file))
    starting = asyncio.create_task(proc.start(timeout=60))
    pid = await eventually(spool.daemon_pid, timeout=30, what="the pid in relayd.lock")
    os.kill(pid, signal.SIGTERM)
    assert not starting.done()
    with contextlib.suppress(AssertionError):
        await starting  # it may stop before server.started or right after it
    assert await proc.wait() == 0
    assert proc.events("server.stopped"), proc.raw[-5:]
    assert not any("Traceback" in line for line in proc.raw)
    assert len(os.listdir(spool.root / "queue")) == QUEUED
