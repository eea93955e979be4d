"""Playing by one upstream's rules: its reply table and its limiter, together.

The relay asks ``admit`` before it hands a message to an upstream's worker (does the rate or
the daily quota allow one more now?), ``lease``/``release`` around a session, and
``judge``/``judge_error`` about what the server answered; ``enact`` carries out a verdict on
the limiter and says until when it holds. Whether the upstream may be used at all (paused,
reauth, open) is its breaker's (relayd.breaker), which the workers tell. One Provider per
upstream (pool.Upstream), its rules chosen by the upstream's preset.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from relayd import metrics, pacing, replies
from relayd.config import Config, UpstreamConfig
from relayd.errors import UpstreamError
from relayd.states import OutcomeStatus
from relayd.upstream import Outcome

log = structlog.get_logger()

# Strongest first: when one message gets several upstream verdicts, the longest-lasting wins.
_RANK = {"pause": 0, "reauth": 1, "throttle": 2}


def limiter_for(
    cfg: Config, clock: Callable[[], float], up: UpstreamConfig | None = None
) -> pacing.Limiter:
    """A LocalLimiter, or a SharedLimiter when pacing.redis is set."""
    up = up or cfg.upstream
    limits = pacing.Limits.of(
        up.rate, up.burst, up.daily, up.daily_unit, up.daily_window, up.max_connections
    )
    if not cfg.pacing.redis:
        return pacing.LocalLimiter(limits, clock)
    from relayd.fleet import SharedLimiter

    account = up.account or f"{up.host} {up.username}"
    return SharedLimiter.connect(
        cfg.pacing.redis, cfg.pacing.redis_password, account, limits, cfg.pacing.fleet_size
    )


class Provider:
    """One upstream's rules and limiter, as the relay uses them."""

    def __init__(
        self,
        cfg: Config,
        clock: Callable[[], float] = time.time,
        up: UpstreamConfig | None = None,
    ) -> None:
        self.clock = clock
        self.reauths = 0  # refusals of the login in a row, for the probe's backoff
        self.configure(cfg, up)
        self.waiting = ""  # why the head of its queue waits, for `queue list` and health

    def configure(self, cfg: Config, up: UpstreamConfig | None = None) -> None:
        """(Re)read rules and limits (a reload)."""
        up = up or cfg.upstream
        old: UpstreamConfig | None = getattr(self, "up", None)
        old_pacing: Any = getattr(self, "pacing_cfg", None)
        self.cfg, self.up = cfg, up
        # The single upstream: section keeps the name it had before several upstreams.
        self.name = (up.host or "outbox") if up.name == "default" else up.name
        self.rules = replies.table(replies.compile_rules(up.replies), up.preset)
        # A reload that leaves the limits alone keeps the limiter: its TAT and today's count.
        if old is None or _pacing_key(old_pacing, old) != _pacing_key(cfg.pacing, up):
            self.limiter: pacing.Limiter = limiter_for(cfg, self.clock, up)
        self.pacing_cfg: Any = cfg.pacing
        self.paced = bool(up.rate or up.daily or cfg.pacing.redis)

    async def admit(self, recipients: int) -> float:
        """0.0 when one more message may go now (its slot is taken), else seconds to wait."""
        if self.paced:
            wait = await self.limiter.acquire(recipients)
            if wait is not None:
                self.waiting = (
                    f"waiting for {self.name}'s {wait.limit}, "
                    f"next slot in {math.ceil(wait.seconds)} s"
                )
                return max(wait.seconds, 0.001)
        self.waiting = ""
        return 0.0

    async def lease(self, holder: str) -> bool:
        return bool(await self.limiter.lease(holder))

    async def release(self, holder: str) -> None:
        await self.limiter.release(holder)

    def judge_error(self, err: UpstreamError) -> replies.Verdict | None:
        """The verdict on a session error the server answered; None for relayd's own."""
        if err.synthetic or err.code is None:
            return None
        return replies.classify(err.code, "", err.text, self.rules)

    def judge(self, outcomes: Sequence[Outcome]) -> dict[str, replies.Verdict]:
        """Upstream verdicts (pause, throttle, reauth) by recipient, from the server's replies."""
        found = {}
        for o in outcomes:
            if o.status == OutcomeStatus.DELIVERED or o.synthetic or o.code is None:
                continue
            verdict = replies.classify(o.code, "", o.text, self.rules)
            if verdict.upstream:
                found[o.address] = verdict
        return found

    @staticmethod
    def strongest(verdicts: Sequence[replies.Verdict]) -> replies.Verdict:
        return min(verdicts, key=lambda v: _RANK[v.action])

    async def enact(self, verdict: replies.Verdict) -> float:
        """Carry out an upstream verdict on the limiter; returns until when it holds (for a
        throttle: now, the message is retried at its next slot)."""
        now = self.clock()
        rt = self.cfg.retry
        if verdict.action == "throttle":
            limit = verdict.rule.limit if verdict.rule else "rate"
            seconds = verdict.seconds or replies.THROTTLE_FOR
            await self.limiter.throttle(limit, seconds)
            self.paced = True
            metrics.THROTTLED.inc()
            log.warning("upstream.throttled", upstream=self.name, limit=limit,
                        seconds=seconds, reply=verdict.reply)  # fmt: skip
            return now
        if verdict.action == "reauth":
            metrics.REAUTH.inc()
            self.reauths += 1
            backoff = min(rt.max_delay, rt.initial_delay * 2.0 ** (self.reauths - 1))
            return now + (verdict.seconds or backoff)
        return now + (verdict.seconds or replies.DAILY_PAUSE)

    def settle(self, delivered: bool) -> None:
        """After an attempt: a delivery ends the run of refused logins."""
        if delivered:
            self.reauths = 0

    def snapshot(self) -> dict[str, Any]:
        """Why a due message waits, today's count and the rate in force (the state is the
        breaker's: pool.snapshot puts both together)."""
        return {"waiting": self.waiting, "pid": os.getpid(), **self.limiter.state()}

    async def close(self) -> None:
        close = getattr(self.limiter, "close", None)
        if close is not None:
            await close()

    async def refresh(self) -> None:
        """Re-read shared state (Redis) for the next snapshot; local state is always fresh."""
        refresh = getattr(self.limiter, "refresh", None)
        if refresh is not None:
            await refresh()


def _pacing_key(pc: Any, up: UpstreamConfig) -> tuple[Any, ...]:
    limits = (up.rate, up.burst, up.daily, up.daily_unit, up.daily_window, up.max_connections)
    return (*limits, up.host, up.username, up.account, pc)
