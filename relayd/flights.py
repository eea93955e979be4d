"""A flight: one message, and what more of its upstream's queue joins it once the session is up.

A worker's session carries up to FLIGHT messages in one send_many (one write and one round trip
with PIPELINING and CHUNKING), bounded by max_messages_per_session and by what the upstream's
pacing grants now; each message's result is then carried out in flight order as if it had been
sent alone: the upstream's verdicts (relayd.verdicts), failover, the ledger. A mixin of
workers.Workers.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from relayd import metrics, outcome
from relayd.config import UpstreamConfig
from relayd.envelope import Envelope
from relayd.errors import UpstreamError
from relayd.pool import Flight, Upstream, shape, trail
from relayd.states import OutcomeStatus
from relayd.upstream import Outcome, Result, Submission
from relayd.verdicts import Verdicts

log = structlog.get_logger()

# Messages one session carries per flight (one write, one round trip with PIPELINING and
# CHUNKING). Bounded because a connection lost mid-flight sends all of them again.
FLIGHT = 16
BUSY_RETRY = 1.0  # seconds before a message whose session found no free connection tries again
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


class Flights(Verdicts):
    """The sending side of workers.Workers (Relay implements the index hooks)."""

    connect: Callable[[UpstreamConfig], Deliverer]

    def _later(self, msg_id: str, when: float) -> None:
        raise NotImplementedError

    def _done(self, msg_id: str) -> None:
        raise NotImplementedError

    async def _take(self, up: Upstream, room: int) -> list[Flight]:
        raise NotImplementedError

    async def _crashed(
        self, env: Envelope, exc: Exception, bound: Any, extra: dict[str, Any]
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

    async def _deliver(
        self, up: Upstream, flight: Flight, session: Deliverer | None
    ) -> tuple[Deliverer | None, bool]:
        """The flight's message through this upstream's session; once the session is up, more
        of this upstream's queue joins it (one write with PIPELINING), as pacing grants."""
        first = _prepare(up, flight)
        try:
            session = await self._session(up, session)
        except _NoConnection:
            self._later(flight.msg_id, self.clock() + BUSY_RETRY)
            return None, False
        except UpstreamError as err:
            metrics.UPSTREAM_FAILURES.labels(step=err.step).inc()
            return None, await self._failed(up, flight, err, first[0], first[3])
        room = up.cfg.max_messages_per_session - session.sent
        more = await self._take(up, min(FLIGHT if session.pipelining else 1, room) - 1)
        batch = [(flight, first), *[(f, _prepare(up, f)) for f in more]]
        handed = [False] * len(batch)
        try:
            session, kept = await self._carry_flight(up, batch, session, handed)
        finally:
            for (f, _), went in list(zip(batch, handed, strict=True))[1:]:
                if not went:
                    self._done(f.msg_id)
        return (session if kept else None), handed[0]

    async def _carry_flight(
        self, up: Upstream, batch: list[tuple[Flight, Prepared]], session: Deliverer,
        handed: list[bool],
    ) -> tuple[Deliverer, bool]:  # fmt: skip
        """One send_many for the batch, then each message's result in flight order."""
        subs = [
            Submission(p[1], tuple(r.address for r in f.env.pending) if f.env else (), p[2])
            for f, p in batch
        ]
        started = time.monotonic()
        try:
            session, results = await self._send(up, subs, session)
        except Exception as exc:  # not the upstream's answer: each records an attempt
            await _close(session)
            for f, p in batch:
                assert f.env is not None
                await self._crashed(f.env, exc, p[0], p[3])
            return session, False
        kept = True
        for i, ((f, p), result) in enumerate(zip(batch, results, strict=True)):
            ok, handed[i] = await self._result(up, f, p, result, started)
            kept = kept and ok
        if kept and session.sent < up.cfg.max_messages_per_session:
            return session, True
        await _close(session)
        return session, False

    async def _result(
        self, up: Upstream, f: Flight, p: Prepared, result: Result, started: float
    ) -> tuple[bool, bool]:
        """One message's result; (the session may carry more, the flight went elsewhere)."""
        assert f.env is not None
        if isinstance(result, UpstreamError):
            metrics.UPSTREAM_FAILURES.labels(step=result.step).inc()
            return False, await self._failed(up, f, result, p[0], p[3])
        metrics.DELIVERY_SECONDS.observe(time.monotonic() - started)
        outcomes = [outcome.clipped(o) for o in result]
        verdict = await self._judged(up, outcomes)
        if verdict is not None:
            bad = next(o for o in outcomes if o.status != OutcomeStatus.DELIVERED)
            return False, await self._held(up, f, verdict, bad, p[0])
        await self._apply(f.env, outcomes, p[0], extra=p[3])
        up.provider.settle(delivered=any(o.status == OutcomeStatus.DELIVERED for o in outcomes))
        return True, False

    async def _session(self, up: Upstream, session: Deliverer | None) -> Deliverer:
        """The worker's session, or a fresh one under a connection lease."""
        if session is not None:
            await up.provider.lease(HOLDER.get())  # renews a shared lease before it expires
            return session
        if not await up.provider.lease(HOLDER.get()):
            raise _NoConnection
        fresh = self.connect(up.cfg)
        try:
            await fresh.open()
        except BaseException:
            await _close(fresh)
            raise
        up.breaker.record_success()
        return fresh

    async def _send(
        self, up: Upstream, subs: list[Submission], session: Deliverer
    ) -> tuple[Deliverer, list[Result]]:
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
            fresh = await self._session(up, None)
        except UpstreamError as err:
            return session, [err for _ in subs]
        except _NoConnection:
            busy = UpstreamError("no free connection", step="connect", temporary=True)
            return session, [busy for _ in subs]
        return fresh, await fresh.send_many(subs)


# What a message is sent as through one upstream: log binding, sender, body, history fields.
Prepared = tuple[Any, str, bytes, dict[str, Any]]


def _prepare(up: Upstream, flight: Flight) -> Prepared:
    env = flight.env
    assert env is not None
    bound = log.bind(msg_id=env.id, attempt=env.attempts + 1, upstream=up.name)
    mail_from, data, note = shape(up, env, flight.data, bound)
    return bound, mail_from, data, {**trail(flight, up.name), **note}


async def _close(session: Deliverer | None) -> None:
    if session is not None:
        await session.close()
