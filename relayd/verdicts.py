"""What a worker does about a reply that is about the upstream, not the message.

provider.Provider judges a server's reply by the upstream's reply rules; the verdict goes to
the upstream's breaker (the one owner of its state) and its limiter. A pause skips the upstream:
the message moves on to the route's next usable upstream at once, as the same attempt and
without one being counted; with none, it stays queued until the pause ends. A reauth opens the
upstream like a refused login (a critical line, a metric) and the message fails over. A throttle
slows the upstream's limiter and the message is retried at its next slot. A mixin of
workers.Workers, which supplies the failover steps.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import structlog

from relayd import metrics, replies
from relayd.breaker import CONNECTION_STEPS, UpstreamState
from relayd.envelope import HISTORY_LIMIT, Envelope, iso
from relayd.errors import SpoolError, UpstreamError
from relayd.pool import Flight, Upstream
from relayd.replies import Verdict
from relayd.spool import Spool
from relayd.states import OutcomeStatus
from relayd.upstream import Outcome

log = structlog.get_logger()


class Verdicts:
    """The upstream-verdict side of workers.Workers (a mixin: Workers implements the hooks)."""

    spool: Spool
    clock: Callable[[], float]
    stopping: bool

    def forget(self, msg_id: str) -> None:
        raise NotImplementedError

    def enqueue(self, env: Envelope) -> None:
        raise NotImplementedError

    def _pick(self, flight: Flight) -> Upstream | None:
        raise NotImplementedError

    async def _pass_on(self, flight: Flight, target: Upstream | None) -> bool:
        raise NotImplementedError

    async def _move_waiting(self, up: Upstream, err: UpstreamError) -> None:
        raise NotImplementedError

    def _upstream_failed(self, up: Upstream, err: UpstreamError, bound: Any) -> None:
        raise NotImplementedError

    async def _defer(
        self, env: Envelope, err: UpstreamError, bound: Any, extra: dict[str, Any]
    ) -> None:
        raise NotImplementedError

    async def _failed(
        self, up: Upstream, flight: Flight, err: UpstreamError, bound: Any, extra: dict[str, Any]
    ) -> bool:
        """A session error: the upstream's (fail over) or the message's (defer it)."""
        assert flight.env is not None
        verdict = up.provider.judge_error(err)
        if verdict is not None and verdict.action in ("pause", "throttle"):
            reply = Outcome("", OutcomeStatus.TEMPORARY, err.code, err.text, err.step)
            return await self._held(up, flight, verdict, reply, bound)
        if verdict is not None and verdict.action == "reauth":
            err.reauth = True
            await up.provider.enact(verdict)
        if err.step not in CONNECTION_STEPS and not err.reauth:
            # Something about this message (or a session lost during it): its outcome.
            await self._defer(flight.env, err, bound, extra)
            return False
        self._upstream_failed(up, err, bound)
        flight.failed.append((up.name, err))
        await self._move_waiting(up, err)
        return await self._pass_on(flight, self._pick(flight))

    async def _judged(self, up: Upstream, outcomes: list[Outcome]) -> Verdict | None:
        """Replies about the upstream (quota, rate, login), not the message: the verdict when
        the whole message is held; recipients delivered meanwhile make it an ordinary retry."""
        verdicts = up.provider.judge(outcomes)
        if not verdicts:
            return None
        verdict = up.provider.strongest(list(verdicts.values()))
        if not any(o.status == OutcomeStatus.DELIVERED for o in outcomes):
            return verdict
        await self._tell(up, verdict)
        outcomes[:] = [
            dataclasses.replace(o, status=OutcomeStatus.TEMPORARY) if o.address in verdicts else o
            for o in outcomes
        ]
        return None

    async def _tell(self, up: Upstream, verdict: Verdict) -> float:
        """Carry out an upstream verdict on its limiter and breaker; returns until when."""
        until = await up.provider.enact(verdict)
        b, reason = up.breaker, verdict.reply
        up.resting = up.resting or verdict.action != "throttle"
        if verdict.action == "pause":
            if b.state != UpstreamState.PAUSED:
                log.warning("upstream.paused", upstream=up.name,
                            seconds=round(until - self.clock(), 3), reply=reason)  # fmt: skip
            b.pause(until, reason)
        elif verdict.action == "throttle":
            seconds = verdict.seconds or replies.THROTTLE_FOR
            b.throttle(reason, self.clock() + seconds)
        else:
            self._reauth(up, reason)
        return until

    def _reauth(self, up: Upstream, reason: str) -> None:
        up.resting = True
        if up.breaker.state != UpstreamState.REAUTH:
            # A refused login needs a person: logged at critical, which alerting pages on.
            log.critical("upstream.reauth_needed", upstream=up.name, reply=reason)
        up.breaker.reauth(reason)  # waits for a reload or a successful probe

    async def _held(
        self, up: Upstream, flight: Flight, verdict: Verdict, reply: Outcome, bound: Any
    ) -> bool:
        """The upstream must wait (pause), or slow down (throttle): no attempt is counted.
        Paused, the flight moves on to the route's next usable upstream at once; with none it
        stays queued until the pause ends. Throttled, it is retried at its next slot."""
        assert flight.env is not None
        until = await self._tell(up, verdict)
        if verdict.action == "pause":
            flight.passed.add(up.name)
            target = self._pick(flight)
            bound.info("upstream.skipped", reason="paused", step=reply.step, code=reply.code,
                       next=target.name if target else None)  # fmt: skip
            if target is not None and not self.stopping:
                return await self._pass_on(flight, target)
        await self._hold(flight.env, verdict, until, reply, bound)
        return False

    async def _hold(
        self, env: Envelope, verdict: Verdict, until: float, reply: Outcome, bound: Any
    ) -> None:
        """Keep the message queued without counting an attempt: the upstream must wait."""
        now = self.clock()
        said = {"step": reply.step, "code": reply.code, "text": reply.text, "at": iso(now)}
        entry = {**said, "attempt": env.attempts, "result": verdict.action}
        env = dataclasses.replace(
            env,
            next_attempt_at=until,
            history=(*env.history, entry)[-HISTORY_LIMIT:],
            last_error={**said, "action": verdict.action},
        )
        try:
            await asyncio.to_thread(self.spool.save, env)
        except SpoolError:
            self.forget(env.id)  # deleted by an operator during the attempt
            return
        metrics.HELD.labels(action=verdict.action).inc()
        bound.info("delivery.held", action=verdict.action,
                   retry_in=round(max(0.0, until - now), 3), step=reply.step,
                   code=reply.code, text=reply.text)  # fmt: skip
        if not self.stopping:
            self.enqueue(env)
