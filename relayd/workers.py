"""The upstream workers: each takes flights from its upstream's queue and sends them.

One worker owns at most one pooled session (per upstream and credential; a reload retires
it). A flight whose upstream fails before the message is in the session (dns, connect, tls,
banner, ehlo, auth) counts on that upstream's breaker and goes on, as the same attempt, to the
next usable upstream of its route; what waits for the failed upstream follows it, instead of
dialling it again. A reply about the upstream rather than the message (provider.Provider
judges it by the upstream's reply rules) tells its breaker: a pause skips the upstream and the
message moves on to the next one at once, no attempt counted (with none, it stays queued until
the pause ends); a reauth opens it like a refused login; a throttle slows its limiter. A reply
about the message itself is the message's outcome (relay.Relay, into which this class is mixed,
carries outcomes out and owns the due-time index and the pacing of dispatch).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

import structlog

from relayd import outcome, presets, rewrite
from relayd.config import Config, UpstreamConfig
from relayd.envelope import Envelope
from relayd.errors import SpoolError, UpstreamError
from relayd.flights import HOLDER, Deliverer, Flights
from relayd.pool import Flight, Pool, Upstream, trail
from relayd.spool import Spool
from relayd.upstream import Outcome

log = structlog.get_logger()

IDLE_CLOSE = 10.0  # seconds an idle upstream session is kept for the next message


class Workers(Flights):
    """The worker side of relay.Relay (a mixin: Relay sets these and implements the hooks)."""

    spool: Spool
    cfg: Config
    connect: Callable[[UpstreamConfig], Deliverer]
    clock: Callable[[], float]
    pool: Pool
    inflight: set[str]
    hints: dict[str, tuple[str, ...]]
    stopping: bool
    generation: int
    wake: asyncio.Event
    ledger: Any

    # -- carried out by Relay: the index and the outcome policy ----------------------------

    def forget(self, msg_id: str) -> None:
        raise NotImplementedError

    def _park(self, msg_id: str, via: tuple[str, ...]) -> None:
        raise NotImplementedError

    def _retry_later(self, msg_id: str) -> None:
        raise NotImplementedError

    def _later(self, msg_id: str, when: float) -> None:
        raise NotImplementedError

    def enqueue(self, env: Envelope) -> None:
        raise NotImplementedError

    async def _take(self, up: Upstream, room: int) -> list[Flight]:
        raise NotImplementedError

    async def _crashed(
        self, env: Envelope, exc: Exception, bound: Any, extra: dict[str, Any]
    ) -> None:
        raise NotImplementedError

    async def _record(self, decision: outcome.Decision, bound: Any) -> None:
        raise NotImplementedError

    def _done(self, msg_id: str) -> None:
        raise NotImplementedError

    async def _defer(
        self, env: Envelope, err: UpstreamError, bound: Any, extra: dict[str, Any]
    ) -> None:
        raise NotImplementedError

    async def _apply(
        self,
        env: Envelope,
        outcomes: list[Outcome],
        bound: Any,
        hint: str = "",
        extra: dict[str, Any] | None = None,
    ) -> None:
        raise NotImplementedError

    async def _finish(self, decision: outcome.Decision) -> None:
        raise NotImplementedError

    # -- the workers -------------------------------------------------------------------------

    def _staff(self, up: Upstream) -> None:
        """Workers 0..max_connections-1 for an upstream (a reload may have raised the number)."""
        for n in range(self._seats(up)):
            if n >= len(up.workers):
                up.workers.append(asyncio.create_task(self._worker(up, n)))
            elif up.workers[n].done():
                up.workers[n] = asyncio.create_task(self._worker(up, n))

    def _seats(self, up: Upstream) -> int:
        """Sessions this relayd runs for up: its share of max_connections when a fleet shares
        them through Redis, so the relayds do not take one another's leases (and rate slots)."""
        pc, most = self.cfg.pacing, up.cfg.max_connections
        return max(1, most // pc.fleet_size) if pc.redis else most

    def _dismiss(self, up: Upstream) -> list[asyncio.Task[None]]:
        """Empty an upstream's queue and tell its workers to end; returns them."""
        while not up.queue.empty():
            flight = up.queue.get_nowait()
            if flight is not None:
                self._done(flight.msg_id)
        for _ in up.workers:
            up.queue.put_nowait(None)
        return up.workers

    async def _worker(self, up: Upstream, n: int) -> None:
        HOLDER.set(f"{os.getpid()}.{up.name}.{n}")
        session: Deliverer | None = None
        generation = self.generation
        try:
            while True:
                up.idle += 1
                try:
                    async with asyncio.timeout(IDLE_CLOSE if session else None):
                        flight = await up.queue.get()
                except TimeoutError:
                    await self._drop(up, session)
                    session = None
                    continue
                finally:
                    up.idle -= 1
                if flight is None:
                    return
                if up.removed or n >= self._seats(up):
                    await self._hand_back(up, flight)  # a reload removed this worker's slot
                    return
                if session is not None and generation != self.generation:
                    await _close(session)  # opened under the config before a reload
                    session = None
                if session is None:
                    generation = self.generation
                session = await self._carry(up, flight, session)
        finally:
            await self._drop(up, session)

    async def _carry(
        self, up: Upstream, flight: Flight, session: Deliverer | None
    ) -> Deliverer | None:
        """One flight on this worker; returns the session to keep."""
        handed = False
        try:
            session, handed = await self._fly(up, flight, session)
        except Exception:
            # A bug must not kill the worker or lose the message: it stays queued
            # as it was and is tried again, backing off.
            log.exception("delivery.crashed", msg_id=flight.msg_id)
            await _close(session)
            session = None
            self._retry_later(flight.msg_id)
        finally:
            if not handed:
                self._done(flight.msg_id)
            if session is None:
                await up.provider.release(HOLDER.get())
            self.wake.set()  # a free worker: the scheduler may hand out the next slot
        return session

    async def _drop(self, up: Upstream, session: Deliverer | None) -> None:
        """Close the session and give its connection lease back."""
        await _close(session)
        await up.provider.release(HOLDER.get())

    async def _hand_back(self, up: Upstream, flight: Flight) -> None:
        if not up.removed:
            up.queue.put_nowait(flight)  # another worker of the same upstream takes it
        elif not await self._pass_on(flight, self._pick(flight)):
            self._done(flight.msg_id)

    async def _fly(
        self, up: Upstream, flight: Flight, session: Deliverer | None
    ) -> tuple[Deliverer | None, bool]:
        """Try one flight on this upstream; (session to keep, whether it went elsewhere)."""
        up.probe_sent_until = 0.0  # if this flight was the probe, it is here: admit() decides
        if not await self._route(flight):
            return session, False
        target = self.pool.pick(flight.via, flight.skip(), self.clock())
        if target is not up:
            return session, await self._pass_on(flight, target)
        up.probe_sent_until = 0.0
        if up.provider.paced and flight.slot != up.name:
            self._later(flight.msg_id, self.clock())  # failed over to a paced upstream: its
            return session, False  # slot comes from the scheduler, in arrival order
        if session is None and not up.breaker.admit(self.clock()):
            flight.passed.add(up.name)  # another worker is probing it
            return session, await self._pass_on(flight, self._pick(flight))
        return await self._deliver(up, flight, session)

    async def _route(self, flight: Flight) -> bool:
        """Load the flight and set its route's upstreams; False when it ended here."""
        if flight.env is None and not await self._load(flight):
            return False
        assert flight.env is not None
        env = flight.env
        header_from = rewrite.header_from(flight.data) if self.pool.table.uses_header_from else None
        decision = self.pool.decide(env, header_from)
        flight.via = decision.via
        if len(self.pool.upstreams) > 1:
            self.hints[env.id] = decision.via
        if decision.via:
            return True
        why = f"no route accepts this sender under the current config: {decision.refusal}"
        err = UpstreamError(why, step="route", temporary=True, hint="check routes:")
        await self._defer(env, err, log.bind(msg_id=env.id, attempt=env.attempts + 1), {})
        return False

    async def _load(self, flight: Flight) -> bool:
        # One trip to a thread for envelope and body: each trip costs the loop a wake-up.
        return await self._loaded(flight, (await asyncio.to_thread(self._read, [flight]))[0])

    async def _preload(self, flights: list[Flight]) -> list[Flight]:
        """Load a flight's extra messages in one thread trip; those that ended here are done."""
        todo = [f for f in flights if f.env is None]
        got = dict(zip(map(id, todo), await asyncio.to_thread(self._read, todo), strict=True))
        kept = []
        for f in flights:
            if id(f) not in got or await self._loaded(f, got[id(f)]):
                kept.append(f)
            else:
                self._done(f.msg_id)
        return kept

    def _read(self, flights: list[Flight]) -> list[tuple[Envelope, bytes] | None]:
        out: list[tuple[Envelope, bytes] | None] = []
        for f in flights:
            try:
                out.append(self.spool.load_message(f.msg_id))
            except SpoolError:
                out.append(None)  # deleted (relayd queue delete) or moved meanwhile
        return out

    async def _loaded(self, flight: Flight, got: tuple[Envelope, bytes] | None) -> bool:
        if got is None:
            self.forget(flight.msg_id)
            return False
        env, flight.data = got
        expired = outcome.expiry(env, self.clock(), self.cfg.retry)
        if expired is not None:
            await self._record(expired, log.bind(msg_id=env.id, attempt=env.attempts + 1))
            return False
        flight.env = env
        return True

    def _upstream_failed(self, up: Upstream, err: UpstreamError, bound: Any) -> None:
        if err.reauth:
            self._reauth(up, _describe(err))
        else:
            up.breaker.record_failure(_describe(err), err.step)
        if err.step == "auth":
            bound.error(
                "upstream.auth_failed",
                code=err.code,
                text=err.text,
                hint=err.hint or presets.auth_hint(up.cfg.preset),
            )
        else:
            # Debug: the breaker's state_changed line is the one per outage (auth stays loud).
            bound.debug("upstream.failed", step=err.step, error=str(err))

    def _pick(self, flight: Flight) -> Upstream | None:
        return self.pool.pick(flight.via, flight.skip(), self.clock())

    async def _pass_on(self, flight: Flight, target: Upstream | None) -> bool:
        """The same attempt on target, the route's next usable upstream; False if it ended."""
        if target is not None and not self.stopping:
            target.queue.put_nowait(flight)
            return True
        if not flight.failed:
            self._park(flight.msg_id, flight.via)  # none tried: an attempt is not counted
            return False
        if flight.env is None and not await self._load(flight):
            return False
        assert flight.env is not None
        last, err = flight.failed[-1]
        bound = log.bind(msg_id=flight.msg_id, attempt=flight.env.attempts + 1)
        await self._defer(flight.env, err, bound, trail(flight, last))
        return False

    async def _move_waiting(self, up: Upstream, err: UpstreamError) -> None:
        """The upstream is unreachable: what waits for it moves on instead of dialling it."""
        while not up.queue.empty() and not self.stopping:
            flight = up.queue.get_nowait()
            if flight is None:
                up.queue.put_nowait(None)  # a worker's stop order: keep it for the worker
                return
            flight.failed.append((up.name, err))
            if not await self._pass_on(flight, self._pick(flight)):
                self._done(flight.msg_id)


async def _close(session: Deliverer | None) -> None:
    if session is not None:
        await session.close()


def _describe(err: UpstreamError) -> str:
    code = f"{err.code} " if err.code else ""
    return f"{err.step}: {code}{err.text or err}"
