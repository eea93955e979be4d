"""Carrying out decide()'s Decision: the spool written, the index told, metrics and logs.

An attempt's outcomes (the upstream's replies, a deferral at connect, a crash outside the
attempt) go to outcome.decide; the Decision is recorded through the ledger (relayd.ledger),
which runs the write again until the spool takes it. Sent: removed from queue/; deferred:
saved with its next attempt and put back in the index; failed or expired: moved to failed/.
A mixin of relay.Relay, which owns the due-time index.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from relayd import metrics, outcome
from relayd.errors import UpstreamError
from relayd.spool import Envelope
from relayd.states import AttemptResult, OutcomeStatus, SpoolDir
from relayd.upstream import Outcome
from relayd.workers import Workers

log = structlog.get_logger()


class Decisions(Workers):
    """The outcome side of relay.Relay (a mixin: Relay sets these and owns the index)."""

    consecutive_failures: int
    last_error: dict[str, Any] | None
    last_delivery_at: float | None

    async def _crashed(
        self, env: Envelope, exc: Exception, bound: Any, extra: dict[str, Any]
    ) -> None:
        """An exception that is not the upstream's answer (a bad address the client library
        refuses, a bug): a deferred attempt like any other, with the exception as its reason.
        """
        text = outcome.clip(f"{type(exc).__name__}: {exc}")
        bound.error("delivery.crashed", error=text, exc_info=exc)
        outcomes = [
            Outcome(r.address, OutcomeStatus.TEMPORARY, None, text, "internal") for r in env.pending
        ]
        await self._apply(env, outcomes, bound, extra=extra)

    async def _defer(
        self, env: Envelope, err: UpstreamError, bound: Any, extra: dict[str, Any]
    ) -> None:
        text = outcome.clip(err.text or str(err))
        error = {"step": err.step, "code": err.code, "text": text}
        outcomes = [
            Outcome(r.address, OutcomeStatus.TEMPORARY, err.code, text, err.step, synthetic=True)
            for r in env.pending
        ]
        self.consecutive_failures += 1
        self.last_error = {**error, "at": self.clock(), **({"hint": err.hint} if err.hint else {})}
        await self._apply(env, outcomes, bound, hint=err.hint, extra=extra)

    async def _apply(
        self,
        env: Envelope,
        outcomes: list[Outcome],
        bound: Any,
        hint: str = "",
        extra: dict[str, Any] | None = None,
    ) -> None:
        decided: list[outcome.Decision] = []

        async def write() -> None:  # run again by the ledger until it succeeds
            if not decided:
                now = self.clock()
                decided.append(outcome.decide(env, outcomes, now, self.cfg.retry, trail=extra))
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
