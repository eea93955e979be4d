"""The listener's side of the delivery process: start it, feed it, watch it, replace it.

One Python process cannot accept and deliver on two cores; with this split the listener
process only accepts (spool.put, then 250) and the delivery process (relayd.worker) only
delivers. The spool stays the only bridge: the listener tells the delivery process "a new
message is queued" over a pipe (the records are in relayd.wire), and it would find the message
at its next scan anyway, so a lost notification delays a message but never loses it. End of
its input means stop, so a listener killed with -9 takes its delivery process down; one
silent for relay.hang_timeout is killed and replaced.

No delivery process ready for relay.hang_timeout (it crash-loops, or hangs at start) is a
problem() that health, /healthz and STATUS= report with the reason. The pipe survives any line:
one longer than LINE_LIMIT is skipped, a malformed one logged, and the reader goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys
import time

import structlog

from relayd import eventloop, metrics, wire
from relayd.config import Config
from relayd.spool import Envelope
from relayd.wire import DeliveryStatus

log = structlog.get_logger()

RESTART_DELAY = 1.0  # seconds before a delivery process that died is started again
READY_TIMEOUT = 120.0  # a delivery process must have scanned the queue within this long
LINE_LIMIT = 1 << 20  # bytes of one report line; reports are ~1 KiB, longer ones are skipped


class DeliveryProcess:
    """Listener side: starts and supervises the worker, mirrors its state, forwards commands."""

    def __init__(self, cfg: Config, dev: bool) -> None:
        self.cfg = cfg
        self.dev = dev
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = asyncio.Event()
        self.backlog: list[bytes] = []
        self.last_report = time.monotonic()
        self.status = DeliveryStatus()
        self._reader: asyncio.Task[None] | None = None
        self.down_since = time.monotonic()  # since when no delivery process has been ready
        self.exits = 0  # delivery processes that ended since one was last ready
        self.last_exit = ""  # how the last one ended
        self._failure = ""  # the reason the current one sent before exiting (wire.Failed)

    @property
    def depth(self) -> int:
        return self.status.queued

    def snapshot(self) -> DeliveryStatus:
        return self.status

    def down_for(self) -> float:
        """Seconds since a delivery process was last ready (0 while one is)."""
        return 0.0 if self.ready.is_set() else time.monotonic() - self.down_since

    def problem(self) -> str:
        """Why mail is not being delivered, once that has lasted relay.hang_timeout; else ''."""
        down = self.down_for()
        if down < self.cfg.relay.hang_timeout:
            return ""
        how = (
            f"{self.exits} exited since, the last with {self.last_exit}"
            if self.exits
            else "one is still starting"
        )
        return f"no delivery process ready for {down:.0f}s ({how}); mail is queued, not sent"

    def _down(self) -> None:
        if self.ready.is_set():
            self.down_since = time.monotonic()
        self.ready.clear()

    def enqueue(self, env: Envelope) -> None:
        self.status = dataclasses.replace(self.status, queued=self.status.queued + 1)
        self._send(
            wire.Queued(
                env.id, env.next_attempt_at, env.created_at, env.mail_from, len(env.pending)
            )
        )

    def flush(self) -> None:
        self._send(wire.Flush())

    async def rescan(self) -> int:
        self._send(wire.Rescan())
        return self.depth

    def reconfigure(self, cfg: Config) -> None:
        self.cfg = cfg
        self._send(wire.Reconfigure(cfg))

    def _send(self, command: wire.Command) -> None:
        line = wire.encode(command)
        proc = self.proc
        if not self.ready.is_set() or proc is None or proc.stdin is None:
            self.backlog.append(line)  # replayed once the worker is up; duplicates are harmless
            return
        with contextlib.suppress(ConnectionError):
            proc.stdin.write(line)

    async def load(self) -> int:
        """Start the worker and wait until it has scanned the queue; returns the depth."""
        self._down()
        self._failure = ""
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relayd.worker",
            eventloop.resolve(self.cfg.relay.event_loop),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=LINE_LIMIT,
        )
        self.last_report = time.monotonic()
        assert self.proc.stdin is not None
        self.proc.stdin.write(wire.encode(wire.Start(self.cfg, self.dev)))
        assert self.proc.stdout is not None
        self._reader = asyncio.create_task(self._read(self.proc.stdout))
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

    async def _read(self, stdout: asyncio.StreamReader) -> None:
        """Take every report line until end of output; no line can end the reading."""
        while True:
            try:
                raw = await stdout.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    self._take(exc.partial)
                return
            except asyncio.LimitOverrunError:
                skipped = await _skip_line(stdout)
                self.last_report = time.monotonic()  # a sign of life all the same
                log.error("worker.report_skipped", bytes=skipped, limit=LINE_LIMIT)
                continue
            self._take(raw)

    def _take(self, raw: bytes) -> None:
        self.last_report = time.monotonic()  # any line is a sign of life
        try:
            doc = json.loads(raw)
            report = wire.report_from_json(doc) if isinstance(doc, dict) else None
            if isinstance(report, wire.Report):
                metrics.apply(report.metrics)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            log.error("worker.bad_report", error=f"{type(exc).__name__}: {exc}"[:200])
            return
        if isinstance(report, wire.Ready):
            self.status = dataclasses.replace(self.status, queued=report.depth)
            self.exits, self.last_exit = 0, ""
            self.ready.set()
        elif isinstance(report, wire.Report):
            self.status = report.status
        elif isinstance(report, wire.Failed):
            self._failure = report.reason[:500]

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
            self.exits += 1
            self.last_exit = f"exit code {proc.returncode}" + (
                f": {self._failure}" if self._failure else ""
            )
            log.error(
                "worker.exited",
                pid=proc.pid,
                code=proc.returncode,
                reason=self._failure,
                detail="deliveries paused; starting a new delivery process",
            )
            self.proc = None
            self._down()
            # A crash loop backs off (1, 2, 4 … s, at most hang_timeout) instead of spinning.
            delay = min(RESTART_DELAY * 2 ** (self.exits - 1), self.cfg.relay.hang_timeout)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(delay, RESTART_DELAY)):
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
        self._failure = f"killed after {silent:.0f}s without a report (hung)"
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


async def _skip_line(stdout: asyncio.StreamReader) -> int:
    """Discard the rest of an over-long line, up to and with its newline; returns its bytes."""
    skipped = 0
    while True:
        try:
            skipped += len(await stdout.readuntil(b"\n"))
            return skipped
        except asyncio.LimitOverrunError as exc:
            skipped += len(await stdout.readexactly(exc.consumed))
        except asyncio.IncompleteReadError as exc:
            return skipped + len(exc.partial)
