"""The delivery process: the relay loop in a second process over the same spool.

One Python process cannot accept and deliver on two cores; with this split the listener
process only accepts (spool.put, then 250) and this process only delivers, so a burst is taken
in at the listener's pace while deliveries run beside it. The spool stays the only bridge: the
listener tells the worker "a new message is queued" over a pipe, and the worker would find it
at its next scan anyway, so a lost notification delays a message but never loses it.

Wire format, one JSON object per line. Listener -> worker (the worker's stdin): first
``{"config": …, "dev": …}``, then ``{"new": id, "due": t, "created": t}``, ``{"cmd": "flush"}``,
``{"cmd": "rescan"}``, ``{"cmd": "config", "config": …}``; end of input means stop (so a
listener killed with -9 takes its worker down). Worker -> listener (its stdout):
``{"alive": true}`` every REPORT seconds until ``{"ready": depth}``, then
``{"status": {…}, "metrics": [...]}`` every REPORT seconds; a worker silent for
relay.hang_timeout is killed and replaced.
The worker holds ``<spool>/relay.lock``, so a worker still draining after its listener died
finishes before the next one starts: never two senders on one spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import sys
import time
from typing import Any

import structlog

from relayd import config as config_mod
from relayd import eventloop, logs, metrics
from relayd.config import Config
from relayd.relay import Deliverer, Outbox, Relay
from relayd.spool import Envelope, Spool
from relayd.upstream import Session

log = structlog.get_logger()

REPORT = 0.5  # seconds between status/metrics reports from the worker
RESTART_DELAY = 1.0  # seconds before a worker that died is started again
READY_TIMEOUT = 120.0  # a worker must have scanned the queue within this long
DRAIN_TIMEOUT = 10.0  # seconds in-flight deliveries get once the worker is told to stop


class WorkerRelay:
    """Listener side: starts and supervises the worker, mirrors its state, forwards commands."""

    def __init__(self, cfg: Config, dev: bool) -> None:
        self.cfg = cfg
        self.dev = dev
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = asyncio.Event()
        self.backlog: list[bytes] = []
        self.last_report = time.monotonic()
        self.status: dict[str, Any] = {
            "queued": 0,
            "in_flight": 0,
            "oldest_age": 0.0,
            "consecutive_failures": 0,
            "last_error": None,
            "last_delivery_at": None,
        }
        self._reader: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        return int(self.status["queued"])

    def snapshot(self) -> dict[str, Any]:
        return dict(self.status)

    def enqueue(self, env: Envelope) -> None:
        self.status["queued"] += 1
        self._send({"new": env.id, "due": env.next_attempt_at, "created": env.created_at})

    def flush(self) -> None:
        self._send({"cmd": "flush"})

    async def rescan(self) -> int:
        self._send({"cmd": "rescan"})
        return self.depth

    def reconfigure(self, cfg: Config) -> None:
        self.cfg = cfg
        self._send({"cmd": "config", "config": config_mod.to_json(cfg)})

    def _send(self, doc: dict[str, Any]) -> None:
        line = json.dumps(doc).encode() + b"\n"
        proc = self.proc
        if not self.ready.is_set() or proc is None or proc.stdin is None:
            self.backlog.append(line)  # replayed once the worker is up; duplicates are harmless
            return
        with contextlib.suppress(ConnectionError):
            proc.stdin.write(line)

    async def load(self) -> int:
        """Start the worker and wait until it has scanned the queue; returns the depth."""
        self.ready.clear()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relayd.worker",
            eventloop.resolve(self.cfg.relay.event_loop),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        self.last_report = time.monotonic()
        assert self.proc.stdin is not None
        first = {"config": config_mod.to_json(self.cfg), "dev": self.dev}
        self.proc.stdin.write(json.dumps(first).encode() + b"\n")
        self._reader = asyncio.create_task(self._read(self.proc))
        waiter = asyncio.create_task(self.ready.wait())
        await asyncio.wait(
            {waiter, self._reader}, timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        if not self.ready.is_set():
            waiter.cancel()
            log.error("worker.not_ready", pid=self.proc.pid)
            return self.depth
        backlog, self.backlog = self.backlog, []
        for line in backlog:
            self.proc.stdin.write(line)
        log.info("worker.started", pid=self.proc.pid, queued=self.depth)
        return self.depth

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            try:
                doc = json.loads(raw)
            except ValueError:
                continue
            self.last_report = time.monotonic()  # any line is a sign of life
            if "ready" in doc:
                self.status["queued"] = int(doc["ready"])
                self.ready.set()
            if "status" in doc:
                self.status.update(doc["status"])
            metrics.apply(doc.get("metrics", ()))

    async def run(self, stop: asyncio.Event, drain_timeout: float = 10.0) -> None:
        """Keep a worker running until stop; then let it drain (end of its input) and reap it."""
        while not stop.is_set():
            proc = self.proc
            if proc is None:
                await self.load()
                continue
            exited = asyncio.create_task(proc.wait())
            stopping = asyncio.create_task(stop.wait())
            watchdog = asyncio.create_task(self._watch(proc))
            await asyncio.wait({exited, stopping, watchdog}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            watchdog.cancel()
            if stop.is_set():
                exited.cancel()
                break
            await exited
            log.error(
                "worker.exited",
                pid=proc.pid,
                code=proc.returncode,
                detail="deliveries paused; starting a new delivery process",
            )
            self.proc = None
            self.ready.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RESTART_DELAY):
                    await stop.wait()
        await self.stop(drain_timeout)

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        """Kill a worker whose reports stopped: its loop is stuck, so it delivers nothing.

        A slow upstream does not count: each upstream step is bounded by upstream.timeout
        and the worker's report task keeps running beside its deliveries.
        """
        limit = self.cfg.relay.hang_timeout
        while True:  # a watchdog timer, re-armed by every report
            silent = time.monotonic() - self.last_report
            if silent >= limit:
                break
            await asyncio.sleep(limit - silent)
        log.error(
            "worker.hung",
            pid=proc.pid,
            silent_s=round(silent, 1),
            detail="no report from the delivery process; killing it",
        )
        with contextlib.suppress(ProcessLookupError):
            proc.kill()

    async def stop(self, drain_timeout: float) -> None:
        """End the worker's input (it drains and exits) and reap it, killing it if it lingers."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), drain_timeout + 5)
        except TimeoutError:
            log.error("worker.killed", pid=proc.pid, detail="did not stop in time")
            proc.kill()
            await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)


# -- the worker process ------------------------------------------------------------------------


def _emit(doc: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):  # the listener is gone; end of stdin stops us next
        os.write(1, json.dumps(doc).encode() + b"\n")


async def _commands(relay: Relay, stop: asyncio.Event, stdin: asyncio.StreamReader) -> None:
    async for raw in stdin:
        try:
            doc = json.loads(raw)
        except ValueError:
            log.error("worker.bad_command")
            continue
        if "new" in doc:
            if doc["new"] not in relay.inflight:
                relay.add(doc["new"], float(doc["due"]), float(doc["created"]))
        elif doc.get("cmd") == "flush":
            relay.flush()
        elif doc.get("cmd") == "rescan":
            depth = await relay.rescan()
            log.info("queue.rescanned", queued=depth)
        elif doc.get("cmd") == "config":
            new = config_mod.from_json(doc["config"])
            logs.add_auth_forms(new.upstream.username, new.upstream.password)
            relay.reconfigure(new)
            logs.setup(new.log.format, new.log.level)
    stop.set()  # end of input: the listener is stopping or gone


def _report_once(relay: Relay, events: list[Any]) -> None:
    batch, events[:] = list(events), []
    _emit({"status": relay.snapshot(), "metrics": batch})


async def _alive() -> None:
    while True:  # a heartbeat until the status reports take over
        _emit({"alive": True})
        await asyncio.sleep(REPORT)


async def _report(relay: Relay, events: list[Any]) -> None:
    while True:  # a periodic report, not a wait for a condition
        _report_once(relay, events)
        await asyncio.sleep(REPORT)


def _lock(spool: Spool) -> int:
    """Block until no other worker delivers from this spool (a predecessor may be draining)."""
    fd = os.open(spool.root / "relay.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.warning("worker.waiting", detail="another delivery process is still draining")
        fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


async def _main() -> int:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    first = json.loads(await stdin.readline())
    cfg, dev = config_mod.from_json(first["config"]), bool(first["dev"])
    # Waiting for relay.lock and scanning a large queue take a while: say we are alive meanwhile,
    # or the listener's watchdog (relay.hang_timeout) would take us for stuck.
    alive = asyncio.create_task(_alive())
    logs.setup(cfg.log.format, cfg.log.level)
    logs.add_auth_forms(cfg.upstream.username, cfg.upstream.password)
    spool = Spool(cfg.spool.path)
    await asyncio.to_thread(_lock, spool)
    events: list[Any] = []
    metrics.forward(events)

    def connect() -> Deliverer:
        return Outbox(spool) if dev else Session(relay.cfg.upstream, cfg.listen.hostname)

    relay = Relay(spool, cfg, connect)
    _emit({"ready": await relay.load()})
    alive.cancel()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    commands = asyncio.create_task(_commands(relay, stop, stdin))
    reporter = asyncio.create_task(_report(relay, events))
    await relay.run(stop, DRAIN_TIMEOUT)
    for task in (commands, reporter):
        task.cancel()
    await asyncio.gather(commands, reporter, return_exceptions=True)
    _report_once(relay, events)
    return 0


def main() -> int:
    # Ctrl-C in a terminal reaches the whole process group: the listener decides when to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return eventloop.run(_main(), sys.argv[1] if len(sys.argv) > 1 else "asyncio")


if __name__ == "__main__":
    raise SystemExit(main())
