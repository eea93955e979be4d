"""Admitting due messages: from the due-time index to an upstream's queue, as its pacing allows.

The scheduler hands due messages, in due order, to the first usable upstream of their route;
a worker whose session is up takes more of its own upstream's queue and, paced, what its
limiter grants now. An upstream that must wait holds back only its own mail. Both hold
`admitting`, so rate and daily slots are taken in one order. A mixin of relay.Relay, which
owns the index these read and write.
"""

from __future__ import annotations

import asyncio
import heapq

from relayd import metrics
from relayd.decisions import Decisions
from relayd.pool import Flight, Upstream


class Admission(Decisions):
    """The dispatch side of relay.Relay (a mixin: Relay sets these and owns the index)."""

    due: dict[str, float]
    heap: list[tuple[float, str]]
    parked: set[str]
    paced: set[str]
    rcpts: dict[str, int]
    admitting: asyncio.Lock

    async def _dispatch(self, now: float) -> float | None:
        """Hand due messages, in due order, to the first usable upstream of their route, as
        far as that upstream's pacing and free workers allow; returns seconds until the next
        may go (None: nothing due). An upstream that must wait holds back only its own mail."""
        async with self.admitting:
            return await self._dispatch_due(now)

    async def _dispatch_due(self, now: float) -> float | None:
        held: list[tuple[float, str]] = []  # due, waiting for their upstream's slot
        waits: dict[str, float] = {}  # upstream -> seconds to its next slot (0.0: no worker)
        while self.heap and self.heap[0][0] <= now:
            when, msg_id = heapq.heappop(self.heap)
            if self.due.get(msg_id) != when or msg_id in self.inflight:
                continue  # stale entry: rescheduled, delivered or already on its way
            self.parked.discard(msg_id)
            flight = Flight(msg_id, via=self.hints.get(msg_id) or tuple(self.pool.upstreams))
            target = self.pool.pick(flight.via, set(), now)
            if target is None:
                self._park(msg_id, flight.via)  # no upstream of its route may be tried yet
                continue
            wait = await self._pace(target, msg_id, waits)
            if self.due.get(msg_id) != when or msg_id in self.inflight:
                continue  # changed during the limiter's await
            if wait is not None:
                target.probe_sent_until = 0.0  # not sent: whatever it was picked for waits
                held.append((when, msg_id))
                continue
            if msg_id in self.paced:
                self.paced.discard(msg_id)
                metrics.PACING_WAIT.observe(max(0.0, now - when))
            self.inflight.add(msg_id)
            flight.slot = target.name if target.provider.paced else ""
            target.queue.put_nowait(flight)
        future = self.heap[0][0] - now if self.heap else None
        for entry in held:
            heapq.heappush(self.heap, entry)
        slots = [w for w in waits.values() if w > 0]
        if slots:
            return min(slots) if future is None else min(future, *slots)
        return future  # an upstream without a free worker wakes the scheduler when one is

    async def _take(self, up: Upstream, room: int) -> list[Flight]:
        """Up to room more flights for up's session, never waiting: first from its queue,
        then, paced, due messages its limiter grants now; each loaded and still routed to up.
        The rest stays queued in due order, no attempt counted."""
        taken: list[Flight] = []
        while len(taken) < room and not up.queue.empty():
            flight = up.queue.get_nowait()
            if flight is None:
                up.queue.put_nowait(None)  # a worker's stop order: keep it for the worker
                break
            taken.append(flight)
        if up.provider.paced and len(taken) < room and not self.stopping:
            async with self.admitting:
                taken += await self._admit_for(up, room - len(taken))
        ready = []
        for flight in await self._preload(taken):
            if not await self._route(flight):
                self._done(flight.msg_id)
                continue
            target = self.pool.pick(flight.via, flight.skip(), self.clock())
            if target is up and (flight.slot == up.name or not up.provider.paced):
                ready.append(flight)
            elif target is up:
                self._later(flight.msg_id, self.clock())  # its slot comes from the scheduler
                self._done(flight.msg_id)
            elif not await self._pass_on(flight, target):
                self._done(flight.msg_id)
        return ready

    async def _admit_for(self, up: Upstream, room: int) -> list[Flight]:
        """Due messages routed first to up, in due order, as far as its limiter grants now."""
        now = self.clock()
        out: list[Flight] = []
        skipped: list[tuple[float, str]] = []
        while len(out) < room and self.heap and self.heap[0][0] <= now:
            when, msg_id = heapq.heappop(self.heap)
            if self.due.get(msg_id) != when or msg_id in self.inflight:
                continue
            via = self.hints.get(msg_id) or tuple(self.pool.upstreams)
            if self.pool.pick(via, set(), now) is not up:
                skipped.append((when, msg_id))
                continue
            wait = await up.provider.admit(self.rcpts.get(msg_id, 1))
            if self.due.get(msg_id) != when or msg_id in self.inflight:
                continue
            if wait:
                self.paced.add(msg_id)
                skipped.append((when, msg_id))
                break
            self.paced.discard(msg_id)
            self.parked.discard(msg_id)
            self.inflight.add(msg_id)
            out.append(Flight(msg_id, via=via, slot=up.name))
        for entry in skipped:
            heapq.heappush(self.heap, entry)
        return out

    async def _pace(self, up: Upstream, msg_id: str, waits: dict[str, float]) -> float | None:
        """None when msg_id may go to up now (its slot is taken), else seconds to wait."""
        if up.name in waits:
            return waits[up.name]  # one refusal per upstream and pass: in arrival order
        if not up.provider.paced:
            return None
        if up.queue.qsize() >= up.idle:
            waits[up.name] = 0.0  # a slot is taken only when a worker can use it
            return 0.0
        wait = await up.provider.admit(self.rcpts.get(msg_id, 1))
        if not wait:
            return None
        self.paced.add(msg_id)
        waits[up.name] = wait
        return wait
