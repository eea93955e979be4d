"""The delivery loop: an in-memory index of due times over the spool, and upstream workers.

At least once: a message leaves the spool only after the upstream answered 250 to its DATA
(or failed permanently); a crash before that leaves it queued, to be sent again after restart.
The daemon is the only sender and keeps the ids it is delivering in memory, so no id is ever in
two sessions at once, whatever the CLI does to the files meanwhile.
Recording each outcome is the ledger's (relayd.ledger): if the spool refuses it, the message
is held in memory and never sent again by this process.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import heapq
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from relayd import metrics, outcome
from relayd.config import Config
from relayd.envelope import HISTORY_LIMIT, iso
from relayd.errors import SpoolError, UpstreamError
from relayd.ledger import Ledger
from relayd.provider import Provider
from relayd.replies import Verdict
from relayd.spool import Envelope, Spool
from relayd.states import AttemptResult, OutcomeStatus, SpoolDir
from relayd.upstream import Outcome, Result, Submission
from relayd.wire import DeliveryStatus

log = structlog.get_logger()

IDLE_CLOSE = 10.0  # seconds an idle upstream session is kept for the next message
REFRESH = 2.0  # seconds between reads of the shared pacing state, for health and metrics
BUSY_RETRY = 1.0  # seconds before a message whose session found no free connection tries again
# Messages one session carries per flight (one write, one round trip with PIPELINING and
# CHUNKING). Bounded because a connection lost mid-flight sends all of them again.
FLIGHT = 16
# The worker a session belongs to: the holder of that session's connection lease.
HOLDER: contextvars.ContextVar[str] = contextvars.ContextVar("holder", default="")


class _NoConnection(Exception):
    """Every connection the account allows is held (max_connections, fleet-wide)."""


class Deliverer(Protocol):
    sent: int

    @property
    def pipelining(self) -> bool: ...

    async def open(self) -> None: ...
    async def send(self, mail_from: str, rcpt_to: list[str], data: bytes) -> list[Outcome]: ...
    async def send_many(self, subs: list[Submission]) -> list[Result]: ...
    async def close(self) -> None: ...


class Relay:
    """Owns the due-time index and the upstream workers."""

    def __init__(
        self,
        spool: Spool,
        cfg: Config,
        connect: Callable[[], Deliverer],
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
        self.work: asyncio.Queue[str] = asyncio.Queue()
        self.wake = asyncio.Event()
        self.stopping = False
        self.consecutive_failures = 0
        self.last_error: dict[str, Any] | None = None
        self.last_delivery_at: float | None = None
        self.ledger = Ledger(lambda: self.cfg.retry, clock, self.inflight, self.forget)
        self._crashes: dict[str, int] = {}  # bugs outside an attempt, per id: for the backoff
        self._scanning: set[str] | None = None  # ids added while load() reads the spool
        # Bumped by retire_sessions(): a worker's session opened before the bump is closed
        # before its next message, so that message goes out under the reloaded upstream config.
        self.generation = 0
        self.provider = Provider(cfg, clock)
        self.rcpts: dict[str, int] = {}  # pending recipients, for quotas counted per recipient
        self.paced: set[str] = set()  # due messages told to wait, for the pacing-wait metric
        # Held while a due message is admitted (gate, rate, daily): by the scheduler for a
        # flight's first message, by a worker for the rest of its flight (_take).
        self.admitting = asyncio.Lock()

    # -- index -----------------------------------------------------------------------------

    def enqueue(self, env: Envelope) -> None:
        """Make a spooled message known; it is dispatched when due (at once if due now)."""
        self.add(env.id, env.next_attempt_at, env.created_at, len(env.pending))

    def add(self, msg_id: str, due: float, created: float, rcpts: int = 1) -> None:
        if self._scanning is not None:
            self._scanning.add(msg_id)
        self.due[msg_id] = due
        self.created[msg_id] = created
        self.rcpts[msg_id] = rcpts
        heapq.heappush(self.heap, (due, msg_id))
        self.wake.set()

    @property
    def depth(self) -> int:
        return len(self.due)

    def snapshot(self) -> DeliveryStatus:
        """What health, metrics and STATUS= report about deliveries."""
        return DeliveryStatus(
            queued=len(self.due),
            in_flight=len(self.inflight),
            oldest_age=self.oldest_age(),
            consecutive_failures=self.consecutive_failures,
            last_error=self.last_error,
            last_delivery_at=self.last_delivery_at,
            upstream=self.provider.snapshot(),
            spool_error=self.ledger.spool_error,
        )

    def reconfigure(self, cfg: Config) -> None:
        """Use a reloaded upstream/retry config; open sessions are retired (SIGHUP)."""
        self.cfg = cfg
        self.provider.configure(cfg)
        self.retire_sessions()

    def forget(self, msg_id: str) -> None:
        self.due.pop(msg_id, None)
        self.created.pop(msg_id, None)
        self.rcpts.pop(msg_id, None)
        self.paced.discard(msg_id)

    async def load(self) -> int:
        """Rebuild the index from queue/ (start-up and after CLI edits); returns the depth."""
        # Only what the index needs is kept per envelope: docs/benchmarks.md#start-up-scan
        self._scanning = set()
        try:
            rows = await asyncio.to_thread(
                lambda: [
                    (e.next_attempt_at, e.id, e.created_at, len(e.pending))
                    for e in self.spool.scan(SpoolDir.QUEUE, repair=True)
                ]
            )
            # Kept: what is in flight, and what was queued after the listing was taken.
            keep = self.inflight | self._scanning
        finally:
            self._scanning = None
        self.due = {i: t for i, t in self.due.items() if i in keep}
        self.created = {i: t for i, t in self.created.items() if i in keep}
        self.heap = [(t, i) for i, t in self.due.items() if i not in self.inflight]
        for when, msg_id, created, rcpts in rows:
            if msg_id not in keep:
                self.due[msg_id] = when
                self.created[msg_id] = created
                self.rcpts[msg_id] = rcpts
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
        workers = [asyncio.create_task(self._worker(n)) for n in range(self.workers)]
        scheduler = asyncio.create_task(self._schedule())
        refresher = asyncio.create_task(self._refresh())
        rescans = asyncio.create_task(self._rescan_every(self.cfg.relay.rescan_interval))
        await stop.wait()
        self.stopping = True
        scheduler.cancel()
        refresher.cancel()
        rescans.cancel()
        while not self.work.empty():
            self.inflight.discard(self.work.get_nowait())
        for _ in workers:
            self.work.put_nowait("")
        _, pending = await asyncio.wait(workers, timeout=drain_timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(scheduler, refresher, rescans, *workers, return_exceptions=True)
        await self.ledger.close()
        await self.provider.close()

    async def _refresh(self) -> None:
        while True:  # shared (Redis) pacing state for health, every few seconds
            await self.provider.refresh()
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

    async def _dispatch(self, now: float) -> float | None:
        """Hand due messages to workers in due order, as far as the upstream's gate, pacing
        and free workers allow; returns seconds until the next may go (None: nothing due)."""
        while True:
            if self.provider.paced and len(self.inflight) >= self.workers:
                return None  # a slot is taken only when a worker can use it; its end wakes us
            msg_id, wait = await self._admit(now)
            if msg_id is None:
                return wait
            self.work.put_nowait(msg_id)

    async def _admit(self, now: float) -> tuple[str | None, float | None]:
        """The due head of the queue, in flight now that the upstream's gate and pacing let it
        go (its slot taken); else None and seconds until one may go (None: nothing due)."""
        async with self.admitting:
            while self.heap and self.heap[0][0] <= now:
                when, msg_id = self.heap[0]
                if self.due.get(msg_id) != when or msg_id in self.inflight:
                    heapq.heappop(self.heap)  # stale: rescheduled, delivered or on its way
                    continue
                wait = await self.provider.admit(self.rcpts.get(msg_id, 1))
                if wait:
                    self.paced.add(msg_id)
                    return None, wait
                # Not popped: during the await another entry may have become the heap's head.
                # In flight, this one is stale now and dropped when it reaches the head.
                if msg_id in self.paced:
                    self.paced.discard(msg_id)
                    metrics.PACING_WAIT.observe(max(0.0, now - when))
                self.inflight.add(msg_id)
                return msg_id, None
            return None, (self.heap[0][0] - now if self.heap else None)

    @property
    def workers(self) -> int:
        """Sessions this relayd runs: its share of max_connections when a fleet shares them
        through Redis, so the relayds do not take one another's leases (and rate slots)."""
        up, pc = self.cfg.upstream, self.cfg.pacing
        return max(1, up.max_connections // pc.fleet_size) if pc.redis else up.max_connections

    async def _worker(self, n: int) -> None:
        HOLDER.set(f"{os.getpid()}.{n}")
        session: Deliverer | None = None
        generation = self.generation
        try:
            while True:
                try:
                    async with asyncio.timeout(IDLE_CLOSE if session else None):
                        msg_id = await self.work.get()
                except TimeoutError:
                    await self._drop(session)
                    session = None
                    continue
                if not msg_id:
                    return
                if session is not None and generation != self.generation:
                    await _close(session)  # opened under the config before a reload
                    session = None
                if session is None:
                    generation = self.generation
                ids = [msg_id]  # _attempt adds the rest of the flight in here
                try:
                    session = await self._attempt(ids, session)
                except Exception:
                    # A bug must not kill the worker or lose the messages: they stay queued
                    # as they were and are tried again, backing off.
                    log.exception("delivery.crashed", msg_id=msg_id, flight=len(ids))
                    await _close(session)
                    session = None
                    for i in ids:
                        self._retry_later(i)
                finally:
                    for i in ids:
                        self._done(i)
                    if session is None:
                        await self.provider.release(HOLDER.get())
                    self.wake.set()  # a free worker: the scheduler may hand out the next
        finally:
            await self._drop(session)

    async def _drop(self, session: Deliverer | None) -> None:
        """Close the session and give its connection lease back."""
        await _close(session)
        await self.provider.release(HOLDER.get())

    async def _attempt(self, ids: list[str], session: Deliverer | None) -> Deliverer | None:
        """One flight: a session (opened if needed), the rest of the flight as far as pacing
        grants it now (_take), one send, then each message's result (_apply_flight)."""
        if session is None:
            try:
                session = await self._open()
            except _NoConnection:
                for msg_id in ids:
                    self._later(msg_id, self.clock() + BUSY_RETRY)
                return None
            except UpstreamError as err:
                metrics.UPSTREAM_FAILURES.labels(step=err.step).inc()
                await self._open_failed(ids, err)
                return None
        else:
            await self.provider.lease(HOLDER.get())  # renews a shared lease before it expires
        # Taken once the session is up, so what arrived while it connected joins the flight.
        await self._take(ids, self._flight_size(session))
        batch = await self._load(ids)
        if not batch:
            return session
        started = time.monotonic()
        try:
            session, results = await self._send(batch, session)
        except Exception as exc:  # not the upstream's answer: each message records an attempt
            await _close(session)
            for env, _ in batch:
                await self._crashed(env, exc, log.bind(msg_id=env.id, attempt=env.attempts + 1))
            self.provider.settle(delivered=False)
            return None
        broken = {id(r): r for r in results if isinstance(r, UpstreamError)}
        for failure in broken.values():
            metrics.UPSTREAM_FAILURES.labels(step=failure.step).inc()
        if broken:
            await _close(session)  # broken: closed first, so no retry waits on its QUIT
        held = await self._apply_flight(batch, results, started)
        if broken or held or session.sent >= self.cfg.upstream.max_messages_per_session:
            await _close(session)
            return None
        return session

    def _flight_size(self, session: Deliverer) -> int:
        """Messages the session's next flight may carry. Without PIPELINING a flight saves no
        round trip, so one: what a crash can send twice stays one message per session."""
        room = self.cfg.upstream.max_messages_per_session - session.sent
        return max(1, min(FLIGHT if session.pipelining else 1, room))

    async def _take(self, ids: list[str], size: int) -> None:
        """Fill the flight in ids up to size, never waiting: first with what the scheduler
        admitted already, then with due messages as far as the upstream's gate and pacing
        (rate, daily) grant now. The rest stays queued in due order, no attempt counted."""
        while len(ids) < size and not self.work.empty():
            msg_id = self.work.get_nowait()
            if not msg_id:
                self.work.put_nowait(msg_id)  # the stop sentinel is for a worker to see
                return
            ids.append(msg_id)
        while len(ids) < size and not self.stopping:
            admitted, _ = await self._admit(self.clock())
            if admitted is None:
                return
            ids.append(admitted)

    async def _load(self, ids: list[str]) -> list[tuple[Envelope, bytes]]:
        """Envelope and body of each id still queued; an expired message is failed instead,
        and one the upstream was paused for meanwhile waits with the rest."""

        def load() -> list[tuple[Envelope, bytes] | str]:
            # One trip to a thread for the whole flight: each trip costs the loop a wake-up.
            out: list[tuple[Envelope, bytes] | str] = []
            for msg_id in ids:
                try:
                    out.append(self.spool.load_message(msg_id))
                except SpoolError:
                    out.append(msg_id)
            return out

        batch: list[tuple[Envelope, bytes]] = []
        for item in await asyncio.to_thread(load):
            if isinstance(item, str):
                self.forget(item)  # deleted (relayd queue delete) or moved meanwhile
            elif (expired := outcome.expiry(item[0], self.clock(), self.cfg.retry)) is not None:
                await self._record(expired, log.bind(msg_id=expired.env.id))
            elif shut := self.provider.gate.shut():
                self._later(item[0].id, self.clock() + shut)
            else:
                batch.append(item)
        return batch

    async def _apply_flight(
        self, batch: list[tuple[Envelope, bytes]], results: list[Result], started: float
    ) -> bool:
        """Each message's result in flight order, as for a message sent alone; True when a
        reply about the upstream held one (the session is then closed)."""
        held = delivered = False
        for (env, _), result in zip(batch, results, strict=True):
            bound = log.bind(msg_id=env.id, attempt=env.attempts + 1)
            if isinstance(result, UpstreamError):
                await self._upstream_failed(env, result, bound)
                continue
            metrics.DELIVERY_SECONDS.observe(time.monotonic() - started)
            result = [outcome.clipped(o) for o in result]
            if await self._held(env, result, bound):
                held = True
                continue
            await self._apply(env, result, bound)
            delivered |= any(o.status == OutcomeStatus.DELIVERED for o in result)
        # Once per flight, and not after a hold: a message delivered in the same flight
        # must not reopen the gate a pause (or reauth) in it has just closed.
        if not held:
            self.provider.settle(delivered=delivered)
        return held

    async def _open_failed(self, ids: list[str], err: UpstreamError) -> None:
        """No session: each message of the flight is held or deferred by what err says."""
        for msg_id in ids:
            try:
                env = await asyncio.to_thread(self.spool.load, msg_id)
            except SpoolError:
                self.forget(msg_id)
                continue
            await self._upstream_failed(env, err, log.bind(msg_id=msg_id, attempt=env.attempts + 1))
            self.provider.settle(delivered=False)

    async def _upstream_failed(self, env: Envelope, err: UpstreamError, bound: Any) -> None:
        """A session error: a pause or throttle holds the message; anything else defers it."""
        verdict = self.provider.judge_error(err)
        if verdict is not None and verdict.action in ("pause", "throttle"):
            await self._hold(env, verdict, err.step, err.code, err.text, bound)
            return
        if verdict is not None and verdict.action == "reauth":
            await self.provider.enact(verdict)  # the upstream waits; the message defers as ever
        await self._defer(env, err, bound)
        if err.step in ("dns", "connect", "tls", "banner", "ehlo", "token", "auth"):
            await self._defer_waiting(err)

    async def _held(self, env: Envelope, outcomes: list[Outcome], bound: Any) -> bool:
        """Replies about the upstream (quota, rate, login), not the message: True when the
        whole message is held; recipients delivered meanwhile make it an ordinary retry."""
        verdicts = self.provider.judge(outcomes)
        if not verdicts:
            return False
        verdict = self.provider.strongest(list(verdicts.values()))
        if not any(o.status == OutcomeStatus.DELIVERED for o in outcomes):
            first = next(o for o in outcomes if o.address in verdicts)
            await self._hold(env, verdict, first.step, first.code, first.text, bound)
            return True
        await self._enact(verdict)
        outcomes[:] = [
            dataclasses.replace(o, status=OutcomeStatus.TEMPORARY) if o.address in verdicts else o
            for o in outcomes
        ]
        return False

    async def _enact(self, verdict: Verdict) -> float:
        """Carry out an upstream verdict. After a throttle, what was handed out at the old
        pace and not yet taken by a worker goes back to the index, to pass the slower one."""
        until = await self.provider.enact(verdict)
        if verdict.action == "throttle":
            now = self.clock()
            while not self.work.empty():
                msg_id = self.work.get_nowait()
                if not msg_id:
                    self.work.put_nowait(msg_id)  # the stop sentinel is for a worker to see
                    break
                self.inflight.discard(msg_id)
                self._later(msg_id, now)
        return until

    async def _hold(
        self, env: Envelope, verdict: Verdict, step: str, code: int | None, text: str, bound: Any
    ) -> None:
        """Keep the message queued without counting an attempt: the upstream must wait."""
        until = await self._enact(verdict)
        now = self.clock()
        reply = {"step": step, "code": code, "text": text, "at": iso(now)}
        entry = {**reply, "attempt": env.attempts, "result": verdict.action}
        env = dataclasses.replace(
            env,
            next_attempt_at=until,
            history=(*env.history, entry)[-HISTORY_LIMIT:],
            last_error={**reply, "action": verdict.action},
        )
        try:
            await asyncio.to_thread(self.spool.save, env)
        except SpoolError:
            self.forget(env.id)  # deleted by an operator during the attempt
            return
        metrics.HELD.labels(action=verdict.action).inc()
        bound.info(
            "delivery.held",
            action=verdict.action,
            retry_in=round(max(0.0, until - now), 3),
            step=step,
            code=code,
            text=text,
        )
        if not self.stopping:
            self.enqueue(env)

    async def _open(self) -> Deliverer:
        """A fresh session, under a connection lease (max_connections, fleet-wide)."""
        if not await self.provider.lease(HOLDER.get()):
            raise _NoConnection
        fresh = self.connect()
        try:
            await fresh.open()
        except BaseException:
            await _close(fresh)
            raise
        return fresh

    async def _send(
        self, batch: list[tuple[Envelope, bytes]], session: Deliverer
    ) -> tuple[Deliverer, list[Result]]:
        subs = [
            Submission(env.mail_from, tuple(r.address for r in env.pending), data)
            for env, data in batch
        ]
        results = await session.send_many(subs)
        first = results[0]
        # A reused session the provider closed while idle fails at RSET or MAIL before
        # anything of the flight was accepted: reconnect once, no deferral.
        if not isinstance(first, UpstreamError) or first.step not in ("rset", "mail"):
            return session, results
        if first.code is not None or not session.sent:
            return session, results  # the server's own refusal, or a fresh session: no retry
        await _close(session)
        try:
            fresh = await self._open()
        except UpstreamError as err:
            return session, [err for _ in subs]
        except _NoConnection:
            busy = UpstreamError("no free connection", step="connect", temporary=True)
            return session, [busy for _ in subs]
        return fresh, await fresh.send_many(subs)

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

    async def _defer_waiting(self, err: UpstreamError) -> None:
        """The upstream is unreachable: defer what is waiting instead of dialling per message."""
        while not self.work.empty() and not self.stopping:
            msg_id = self.work.get_nowait()
            try:
                env = await asyncio.to_thread(self.spool.load, msg_id)
                await self._defer(env, err, log.bind(msg_id=msg_id, attempt=env.attempts + 1))
            except SpoolError:
                self.forget(msg_id)
            finally:
                self._done(msg_id)

    async def _crashed(self, env: Envelope, exc: Exception, bound: Any) -> None:
        """An exception that is not the upstream's answer (a bad address the client library
        refuses, a bug): a deferred attempt like any other, with the exception as its reason.
        """
        text = outcome.clip(f"{type(exc).__name__}: {exc}")
        bound.error("delivery.crashed", error=text, exc_info=exc)
        outcomes = [
            Outcome(r.address, OutcomeStatus.TEMPORARY, None, text, "internal") for r in env.pending
        ]
        await self._apply(env, outcomes, bound)

    async def _defer(self, env: Envelope, err: UpstreamError, bound: Any) -> None:
        text = outcome.clip(err.text or str(err))
        error = {"step": err.step, "code": err.code, "text": text}
        outcomes = [
            Outcome(r.address, OutcomeStatus.TEMPORARY, err.code, text, err.step, synthetic=True)
            for r in env.pending
        ]
        self.consecutive_failures += 1
        self.last_error = {**error, "at": self.clock(), **({"hint": err.hint} if err.hint else {})}
        if err.step == "auth":
            bound.error("upstream.auth_failed", code=err.code, text=text, hint=err.hint)
        await self._apply(env, outcomes, bound, hint=err.hint)

    async def _apply(
        self, env: Envelope, outcomes: list[Outcome], bound: Any, hint: str = ""
    ) -> None:
        decided: list[outcome.Decision] = []

        async def write() -> None:  # run again by the ledger until it succeeds
            if not decided:
                now = self.clock()
                decided.append(outcome.decide(env, outcomes, now, self.cfg.retry))
                self._count(decided[0], now, bound)
            await self._carry_out(decided[0], bound, hint)

        await self.ledger.record(env.id, write, bound)

    def _count(self, decision: outcome.Decision, now: float, bound: Any) -> None:
        """The metrics, logs and failure run of an attempt's recipients."""
        delivered = decision.delivered
        if delivered:
            if not decision.temporary:
                self.consecutive_failures = 0
            self.last_delivery_at = now
            metrics.DELIVERED.inc(len(delivered))
            bound.info("delivery.sent", code=delivered[0].code, recipients=len(delivered))
        for o in decision.refused:
            metrics.FAILED.labels(reply_class=outcome.reply_class(o.code)).inc()
            bound.warning("delivery.refused", rcpt=o.address, code=o.code, text=o.text, step=o.step)

    async def _record(self, decision: outcome.Decision, bound: Any) -> None:
        async def write() -> None:
            await self._carry_out(decision, bound, "")

        await self.ledger.record(decision.env.id, write, bound)

    async def _carry_out(self, decision: outcome.Decision, bound: Any, hint: str) -> None:
        env = decision.env
        if decision.kind == AttemptResult.SENT:
            # Gone from the spool: no history entry to write (the common case, kept short).
            await asyncio.to_thread(self.spool.remove, env.id, SpoolDir.QUEUE, False)
            self.forget(env.id)
        elif decision.kind == AttemptResult.DEFERRED:
            await self._reschedule(decision, bound, hint)
        else:
            await self._finish(decision)

    async def _reschedule(self, decision: outcome.Decision, bound: Any, hint: str) -> None:
        env = decision.env
        await asyncio.to_thread(self.spool.save, env)
        metrics.DEFERRED.inc()
        bound.info(
            "delivery.deferred",
            retry_in=round(decision.delay, 3),
            **decision.error_fields,
            **({"hint": hint} if hint else {}),
        )
        if not self.stopping:
            self.enqueue(env)

    async def _finish(self, decision: outcome.Decision) -> None:
        env = decision.env
        await asyncio.to_thread(self.spool.move, env, SpoolDir.FAILED)
        self.forget(env.id)
        if decision.kind == AttemptResult.EXPIRED:
            metrics.FAILED.labels(reply_class="expired").inc()
        log.warning(
            f"delivery.{decision.kind}",
            msg_id=env.id,
            attempts=env.attempts,
            reason=decision.reason,
        )


async def _close(session: Deliverer | None) -> None:
    if session is not None:
        await session.close()
