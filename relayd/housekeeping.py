"""The daemon's housekeeping: watchdog pings, gauges, STATUS= and status.json, every few seconds.

It also proves the event loop alive (/healthz) and says which routes have no usable upstream
(/readyz?upstreams). No step's failure ends the daemon: Chores logs a step once as it starts
failing and once as it works again. A mixin of app.Daemon, which sets these.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import structlog

from relayd import metrics, pool, routes, wire
from relayd.breaker import UpstreamState
from relayd.config import Config
from relayd.notify import Notifier
from relayd.relay import Relay
from relayd.spool import Spool
from relayd.states import SpoolDir
from relayd.supervisor import DeliveryProcess

log = structlog.get_logger()

HOUSEKEEPING = 2.0  # seconds between gauge/status refreshes (shorter with a faster watchdog)
# With no delivery process ready for this many relay.hang_timeouts (5 min by default) the
# WATCHDOG=1 pings stop, so systemd restarts the whole daemon: a fresh start is worth a try
# once restarting the delivery process alone kept failing. Health is red long before that.
RESTART_AFTER_HANG_TIMEOUTS = 10


class Housekeeping:
    """The housekeeping side of app.Daemon (a mixin: Daemon sets these)."""

    cfg: Config
    spool: Spool
    stop: asyncio.Event
    ready: bool
    notifier: Notifier
    relay: Relay | DeliveryProcess
    heartbeat: float
    failed_count: int
    chores: Chores
    gauged: set[str]
    upstream_states: tuple[dict[str, Any], ...]

    def delivery_problem(self) -> str:
        """Why mail is not being delivered (no delivery process ready for a while), or ''."""
        return self.relay.problem() if isinstance(self.relay, DeliveryProcess) else ""

    def _watchdog_due(self) -> bool:
        """WATCHDOG=1 while the loop turns, unless deliveries have been down too long."""
        if not self.notifier.watchdog_interval:
            return False
        if not isinstance(self.relay, DeliveryProcess):
            return True
        limit = RESTART_AFTER_HANG_TIMEOUTS * self.cfg.relay.hang_timeout
        if self.relay.down_for() < limit:
            return True
        log.error("watchdog.withheld", detail=f"{self.delivery_problem()}; systemd restarts relayd")
        return False

    async def _housekeeping(self) -> None:
        """Watchdog ping, gauges, STATUS= and status.json; proves the event loop is alive.

        No step's failure ends the daemon (out of descriptors, EMFILE, each of them fails):
        each is logged when it starts failing and when it works again, and tried next round.
        """
        interval = min(self.notifier.watchdog_interval or HOUSEKEEPING, HOUSEKEEPING)
        while not self.stop.is_set():
            self.heartbeat = time.monotonic()
            if self._watchdog_due():
                ok = self.notifier.send("WATCHDOG=1")
                self.chores.report("watchdog", "" if ok else self.notifier.error)
            await self.chores.run("gauges", self._update_gauges())
            snap = self.relay.snapshot()
            problem = self.delivery_problem()
            self.notifier.send(
                f"STATUS={snap.queued} queued, {snap.in_flight} in flight"
                + (f"; {problem}" if problem else "")
            )
            await self.chores.run("status", asyncio.to_thread(self._write_status, self._status()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self.stop.wait()

    async def _update_gauges(self) -> None:
        """Set the queue gauges from the relay's index (on the loop: it is not thread-safe)."""
        snap = self.relay.snapshot()
        metrics.QUEUE_DEPTH.labels(state=SpoolDir.QUEUE).set(snap.queued)
        metrics.OLDEST_AGE.set(snap.oldest_age)
        for up in snap.upstreams:
            metrics.set_upstream(up)
        self.failed_count = await asyncio.to_thread(_count, self.spool.root / SpoolDir.FAILED)
        metrics.QUEUE_DEPTH.labels(state=SpoolDir.FAILED).set(self.failed_count)
        self.upstream_states = snap.upstreams
        self._upstream_gauges(snap.upstreams)

    def _upstream_gauges(self, upstreams: tuple[dict[str, Any], ...]) -> None:
        names = {str(doc.get("name")) for doc in upstreams}
        for gone in self.gauged - names:  # removed by a reload: its series go too
            for state in UpstreamState:
                with contextlib.suppress(KeyError):
                    metrics.UPSTREAM_STATE.remove(gone, state)
        self.gauged = names
        for doc in upstreams:
            for state in UpstreamState:
                metrics.UPSTREAM_STATE.labels(upstream=doc.get("name"), state=state).set(
                    1.0 if doc.get("state") == state else 0.0
                )

    def unroutable(self) -> str:
        """Which routes have no upstream usable now ("" when every one has): /readyz?upstreams."""
        now = time.time()
        # Called on the HTTP thread: it reads the copy housekeeping took on the loop.
        usable = {str(doc.get("name")): pool.usable_state(doc, now) for doc in self.upstream_states}
        if not usable:
            return ""  # the delivery process has not reported yet: nothing known is broken
        names = routes.unroutable(routes.from_config(self.relay.cfg), usable)
        return f"no usable upstream for route {', '.join(names)}" if names else ""

    def _status(self) -> wire.DaemonStatus:
        """What `relayd health` reads: built on the loop, written by a thread."""
        return wire.DaemonStatus(
            pid=os.getpid(),
            updated_at=time.time(),
            ready=self.ready,
            failed=self.failed_count,
            delivery=self.relay.snapshot(),
            delivery_down=self.delivery_problem(),
        )

    def _write_status(self, status: wire.DaemonStatus) -> None:
        """A small status file for `relayd health` (advisory, not fsynced)."""
        path = Path(self.spool.root) / wire.STATUS_FILE
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(status.to_json()))
        tmp.replace(path)


class Chores:
    """Housekeeping steps that may fail for a while: logged once as they start failing and
    once as they work again, never raised (an error there must not end the daemon)."""

    def __init__(self) -> None:
        self.failing: dict[str, str] = {}

    async def run(self, step: str, coro: Awaitable[None]) -> None:
        """Await one step; an exception is reported, not raised."""
        try:
            await coro
        except Exception as exc:
            self.report(step, str(exc) if isinstance(exc, OSError) else repr(exc))
            return
        self.report(step, "")

    def report(self, step: str, error: str) -> None:
        """error '' means the step worked."""
        if error and step not in self.failing:
            log.error(
                "housekeeping.failed",
                step=step,
                error=error,
                detail="the daemon goes on and tries again every few seconds",
            )
        elif not error and step in self.failing:
            log.info("housekeeping.recovered", step=step, error=self.failing[step])
        if error:
            self.failing[step] = error
        else:
            self.failing.pop(step, None)


def _count(directory: Path) -> int:
    """Messages in a state directory (one .eml each); 0 when it cannot be listed."""
    try:
        return sum(1 for name in os.listdir(directory) if name.endswith(".eml"))
    except OSError:
        return 0
