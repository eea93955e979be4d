"""The delivery loop: an in-memory index of due times over the spool, and the outcome policy.

At least once: a message leaves the spool only after the upstream answered 250 to its DATA
(or failed permanently); a crash before that leaves it queued, to be sent again after restart.
The daemon is the only sender and keeps the ids it is delivering in memory, so no id is ever in
two sessions at once, whatever the CLI does to the files meanwhile.
Recording each outcome is the ledger's (relayd.ledger): if the spool refuses it, the message
is held in memory and never sent again by this process.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable
from typing import Any

import structlog

from relayd import outcome
from relayd.admission import Admission
from relayd.breaker import Breaker, UpstreamState
from relayd.config import Config, UpstreamConfig
from relayd.errors import SpoolError
from relayd.flights import Deliverer
from relayd.ledger import Ledger
from relayd.pool import Pool
from relayd.provider import Provider
from relayd.spool import Envelope, Spool
from relayd.states import SpoolDir
from relayd.wire import DeliveryStatus

__all__ = ["Deliverer", "Relay"]

log = structlog.get_logger()

REFRESH = 2.0  # seconds between reads of the shared pacing state, for health and metrics


class Relay(Admission):
    """Owns the due-time index and the upstream workers (dispatch: admission.Admission;
    outcomes carried out: decisions.Decisions)."""

    def __init__(
        self,
        spool: Spool,
        cfg: Config,
        connect: Callable[[UpstreamConfig], Deliverer],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spool = spool
        self.cfg = cfg
        self.connect = connect
        self.clock = clock
        self.due: dict[str, float] = {}
        self.created: dict[str, float] = {}
        self.heap: list[tuple[float, str]] = []
        self.inflight: set[str] = set()
        self.pool = Pool(cfg, clock, self._breaker_changed)
        # The upstreams a message's route names, once known (only kept with several).
        self.hints: dict[str, tuple[str, ...]] = {}
        self.parked: set[str] = set()  # waiting for an upstream of their route to reopen
        self.running = False
        self.retired: list[asyncio.Task[None]] = []  # workers of upstreams a reload removed
        self.wake = asyncio.Event()
        self.stopping = False
        self.consecutive_failures = 0
        self.last_error: dict[str, Any] | None = None
        self.last_delivery_at: float | None = None
        self.ledger = Ledger(lambda: self.cfg.retry, clock, self.inflight, self.forget)
        self._crashes: dict[str, int] = {}  # bugs outside an attempt, per id: for the backoff
        self._scanning: set[str] | None = None  # ids added while load() reads the spool
        self.rcpts: dict[str, int] = {}  # pending recipients, for quotas counted per recipient
        self.paced: set[str] = set()  # due messages told to wait, for the pacing-wait metric
        # Held while due messages are admitted (rate, daily): by the scheduler, and by a worker
        # filling its flight once its session is up (_take).
        self.admitting = asyncio.Lock()
        # Bumped by retire_sessions(): a worker's session opened before the bump is closed
        # before its next message, so that message goes out under the reloaded upstream config.
        self.generation = 0

    # -- index -----------------------------------------------------------------------------

    def enqueue(self, env: Envelope) -> None:
        """Make a spooled message known; it is dispatched when due (at once if due now)."""
        self.add(env.id, env.next_attempt_at, env.created_at, env.mail_from, len(env.pending))

    def add(
        self, msg_id: str, due: float, created: float, sender: str | None = None, rcpts: int = 1
    ) -> None:
        if self._scanning is not None:
            self._scanning.add(msg_id)
        self.due[msg_id] = due
        self.created[msg_id] = created
        self.rcpts[msg_id] = rcpts
        if sender is not None and len(self.pool.upstreams) > 1:
            self.hints[msg_id] = self.pool.guess(sender)
        heapq.heappush(self.heap, (due, msg_id))
        self.wake.set()

    @property
    def depth(self) -> int:
        return len(self.due)

    @property
    def provider(self) -> Provider:
        """The first upstream's rules and limiter (the only one of a single upstream: config)."""
        return next(iter(self.pool.upstreams.values())).provider

    def snapshot(self) -> DeliveryStatus:
        """What health, metrics and STATUS= report about deliveries."""
        return DeliveryStatus(
            queued=len(self.due),
            in_flight=len(self.inflight),
            oldest_age=self.oldest_age(),
            consecutive_failures=self.consecutive_failures,
            last_error=self.last_error,
            last_delivery_at=self.last_delivery_at,
            upstreams=self.pool.snapshots(),
            spool_error=self.ledger.spool_error,
        )

    def reconfigure(self, cfg: Config) -> None:
        """Use a reloaded config: upstreams added, removed or changed; sessions retired (SIGHUP)."""
        self.cfg = cfg
        self.retire_sessions()
        removed = self.pool.reconfigure(cfg)
        if not self.running or self.stopping:
            return
        for up in self.pool.upstreams.values():
            self._staff(up)  # the new ones, and more workers where max_connections grew
        self.retired = [t for t in self.retired if not t.done()]
        for up in removed:
            self.retired += up.workers
            while not up.queue.empty():
                flight = up.queue.get_nowait()
                if flight is not None:
                    flight.passed.add(up.name)
                    _spawn(self._hand_back(up, flight))
            for _ in up.workers:
                up.queue.put_nowait(None)
        if len(self.pool.upstreams) > 1 or self.hints:
            _spawn(self.load())  # routes may have changed: guess each message's route again

    def forget(self, msg_id: str) -> None:
        self.due.pop(msg_id, None)
        self.created.pop(msg_id, None)
        self.hints.pop(msg_id, None)
        self.parked.discard(msg_id)
        self.rcpts.pop(msg_id, None)
        self.paced.discard(msg_id)

    async def load(self) -> int:
        """Rebuild the index from queue/ (start-up and after CLI edits); returns the depth."""
        # Only what the index needs is kept per envelope: docs/benchmarks.md#start-up-scan
        several = len(self.pool.upstreams) > 1
        self._scanning = set()
        try:
            rows = await asyncio.to_thread(
                lambda: [
                    (
                        e.next_attempt_at,
                        e.id,
                        e.created_at,
                        self.pool.guess(e.mail_from) if several else (),
                        len(e.pending),
                    )
                    for e in self.spool.scan(SpoolDir.QUEUE, repair=True)
                ]
            )
            # Kept: what is in flight, and what was queued after the listing was taken.
            keep = self.inflight | self._scanning
        finally:
            self._scanning = None
        self.due = {i: t for i, t in self.due.items() if i in keep}
        self.created = {i: t for i, t in self.created.items() if i in keep}
        self.hints = {i: h for i, h in self.hints.items() if i in keep}
        self.parked &= keep
        self.heap = [(t, i) for i, t in self.due.items() if i not in self.inflight]
        for when, msg_id, created, hint, rcpts in rows:
            if msg_id not in keep:
                self.due[msg_id] = when
                self.created[msg_id] = created
                self.rcpts[msg_id] = rcpts
                if hint:
                    self.hints[msg_id] = hint
                self.heap.append((when, msg_id))
        heapq.heapify(self.heap)
        self.wake.set()
        return len(self.due)

    async def rescan(self) -> int:
        """Re-read queue/ after an operator edit; returns the depth."""
        return await self.load()

    def flush(self) -> None:
        """Everything queued is due now (SIGUSR1)."""
        now = self.clock()
        self.due = dict.fromkeys(self.due, now)
        self.heap = [(now, i) for i in sorted(self.due) if i not in self.inflight]
        heapq.heapify(self.heap)
        self.wake.set()

    def retire_sessions(self) -> None:
        """Sessions open now carry no further message; the next one connects afresh (SIGHUP)."""
        self.generation += 1

    def oldest_age(self) -> float:
        return self.clock() - min(self.created.values()) if self.created else 0.0

    # -- loop --------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, drain_timeout: float = 10.0) -> None:
        """Dispatch due messages to workers until stop is set; then drain within the deadline."""
        self.running = True
        for up in self.pool.upstreams.values():
            self._staff(up)
        scheduler = asyncio.create_task(self._schedule())
        refresher = asyncio.create_task(self._refresh())
        rescans = asyncio.create_task(self._rescan_every(self.cfg.relay.rescan_interval))
        await stop.wait()
        self.stopping = True
        scheduler.cancel()
        refresher.cancel()
        rescans.cancel()
        workers = [t for up in self.pool.upstreams.values() for t in self._dismiss(up)]
        workers += self.retired
        _, pending = await asyncio.wait(workers, timeout=drain_timeout) if workers else ((), ())
        for task in pending:
            task.cancel()
        await asyncio.gather(scheduler, refresher, rescans, *workers, return_exceptions=True)
        await self.ledger.close()
        for up in self.pool.upstreams.values():
            await up.provider.close()

    async def _refresh(self) -> None:
        while True:  # shared (Redis) pacing state for health, every few seconds
            for up in list(self.pool.upstreams.values()):
                await up.provider.refresh()
            await asyncio.sleep(REFRESH)

    async def _rescan_every(self, interval: float) -> None:
        """A safety net: whatever the index missed is found within one interval."""
        while True:  # a periodic timer, not a wait for a condition
            await asyncio.sleep(interval)
            try:
                await self.load()
            except SpoolError as exc:
                log.error("queue.rescan_failed", error=str(exc))

    async def _schedule(self) -> None:
        while True:
            self.wake.clear()
            delay = await self._dispatch(self.clock())
            try:
                async with asyncio.timeout(delay):
                    await self.wake.wait()
            except TimeoutError:
                pass

    def _park(self, msg_id: str, via: tuple[str, ...]) -> None:
        """Wait, without an attempt, until an upstream of the route may be tried again."""
        if msg_id not in self.due or self.stopping:
            return
        now = self.clock()
        when = self.pool.next_probe(via)
        if when is None or when <= now:
            # A probe is on its way: its success unparks this (_breaker_changed) sooner.
            when = now + self.cfg.retry.initial_delay
        self.due[msg_id] = when
        self.parked.add(msg_id)
        heapq.heappush(self.heap, (when, msg_id))
        self.wake.set()

    def _breaker_changed(self, breaker: Breaker) -> None:
        """An upstream may be used again: what was parked for it is due now."""
        up = self.pool.upstreams.get(breaker.name)
        if up is not None:
            up.probe_sent_until = 0.0  # whatever probe was on its way has had its say
            if up.resting and breaker.state == UpstreamState.OK:
                up.resting = False
                log.info("upstream.resumed", upstream=up.provider.name)
        if not self.parked or breaker.state not in (UpstreamState.OK, UpstreamState.THROTTLED):
            return
        now = self.clock()
        for msg_id in self.parked:
            if msg_id in self.due and msg_id not in self.inflight:
                self.due[msg_id] = now
                heapq.heappush(self.heap, (now, msg_id))
        self.parked.clear()
        self.wake.set()

    def _done(self, msg_id: str) -> None:
        """The attempt on msg_id is over; if it was rescheduled meanwhile, it is due again.

        A message deferred at connect is rescheduled while the others waiting are deferred
        too: if its retry came due before that ended, the scheduler skipped its heap entry
        as "in flight", and nothing would have sent it until the next rescan. A message the
        ledger holds stays in flight until its outcome is recorded.
        """
        if msg_id in self.ledger.held:
            return
        self.inflight.discard(msg_id)
        when = self.due.get(msg_id)
        if when is not None and not self.stopping:
            heapq.heappush(self.heap, (when, msg_id))  # a duplicate entry is skipped as stale
            self.wake.set()

    def _retry_later(self, msg_id: str) -> None:
        """After a bug outside any attempt: try again, backing off (nothing to record it in)."""
        self._crashes[msg_id] = crashes = self._crashes.get(msg_id, 0) + 1
        rt = self.cfg.retry
        self._later(msg_id, self.clock() + outcome.backoff(crashes, rt.initial_delay, rt.max_delay))

    def _later(self, msg_id: str, when: float) -> None:
        """Due again at when, in the index only: no attempt counted, nothing written."""
        if msg_id in self.due and not self.stopping:
            self.due[msg_id] = when
            heapq.heappush(self.heap, (when, msg_id))
            self.wake.set()


_background: set[asyncio.Task[Any]] = set()


def _spawn(coro: Any) -> None:
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)
