"""Playing by one upstream's rules: its reply table, its gate and its limiter, together.

The relay asks ``admit`` before it hands a message to a worker (is the upstream open, does the
rate or the daily quota allow one more now?), ``lease``/``release`` around a session, and
``judge``/``judge_error`` about what the server answered; ``enact`` carries out a verdict
about the upstream (pause, throttle, reauth). One Provider per upstream.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from relayd import metrics, pacing, replies
from relayd.config import Config
from relayd.errors import UpstreamError
from relayd.gate import Gate
from relayd.states import OutcomeStatus
from relayd.upstream import Outcome

log = structlog.get_logger()

# Strongest first: when one message gets several upstream verdicts, the longest-lasting wins.
_RANK = {"pause": 0, "reauth": 1, "throttle": 2}


def limiter_for(cfg: Config, clock: Callable[[], float]) -> pacing.Limiter:
    """A LocalLimiter, or a SharedLimiter when pacing.redis is set."""
    up = cfg.upstream
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
    """One upstream's rules, gate and limiter, as the relay uses them."""

    def __init__(self, cfg: Config, clock: Callable[[], float] = time.time) -> None:
        self.name = cfg.upstream.host or "outbox"
        self.clock = clock
        self.gate = Gate(self.name, clock)
        self.configure(cfg)
        self.waiting = ""  # why the head of the queue waits, for `queue list` and health

    def configure(self, cfg: Config) -> None:
        """(Re)read rules and limits; a reload may carry the fixed password (reauth ends)."""
        old = getattr(self, "cfg", None)
        self.cfg = cfg
        self.rules = replies.table(replies.compile_rules(cfg.upstream.replies))
        # A reload that leaves the limits alone keeps the limiter: its TAT and today's count.
        if old is None or _pacing_key(old) != _pacing_key(cfg):
            self.limiter: pacing.Limiter = limiter_for(cfg, self.clock)
        up = cfg.upstream
        self.paced = bool(up.rate or up.daily or cfg.pacing.redis)
        self.gate.reset()

    async def admit(self, recipients: int) -> float:
        """0.0 when one more message may go now (its slot is taken), else seconds to wait."""
        closed = self.gate.closed_for()
        if closed:
            self.waiting = f"{self.name} is {self.gate.state} until {_clock(self.gate.until)}"
            return closed
        if self.paced:
            wait = await self.limiter.acquire(recipients)
            if wait is not None:
                self.waiting = (
                    f"waiting for {self.name}'s {wait.limit}, "
                    f"next slot in {math.ceil(wait.seconds)} s"
                )
                return max(wait.seconds, 0.001)
        if not self.gate.claim():
            self.waiting = f"{self.name} is {self.gate.state}: one message is probing it"
            return self.gate.closed_for() or 1.0
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
        """Carry out an upstream verdict; returns when the held message may be tried again."""
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
            seconds = verdict.seconds or min(
                rt.max_delay, rt.initial_delay * 2.0**self.gate.reauths
            )
            return self.gate.close("reauth", seconds, verdict.reply)
        return self.gate.close("paused", verdict.seconds or replies.DAILY_PAUSE, verdict.reply)

    def settle(self, delivered: bool) -> None:
        """After an attempt: a delivery opens the gate; a probe that decided nothing ends."""
        if delivered:
            self.gate.opened()
        else:
            self.gate.probe_ended()

    def snapshot(self) -> dict[str, Any]:
        """State, paused-until, today's count and the rate in force, for health and metrics."""
        gate = self.gate.snapshot()
        pace = self.limiter.state()
        throttled = bool(pace.get("throttled_until"))
        return {
            "name": self.name,
            "state": "throttled" if gate["state"] == "ok" and throttled else gate["state"],
            "paused_until": gate["until"] if gate["state"] == "paused" else None,
            "reauth": gate["state"] == "reauth",
            "reason": gate["reason"],
            "waiting": self.waiting,
            "pid": os.getpid(),
            **pace,
        }

    async def close(self) -> None:
        close = getattr(self.limiter, "close", None)
        if close is not None:
            await close()

    async def refresh(self) -> None:
        """Re-read shared state (Redis) for the next snapshot; local state is always fresh."""
        refresh = getattr(self.limiter, "refresh", None)
        if refresh is not None:
            await refresh()


def _pacing_key(cfg: Config) -> tuple[Any, ...]:
    up = cfg.upstream
    limits = (up.rate, up.burst, up.daily, up.daily_unit, up.daily_window, up.max_connections)
    return (*limits, up.host, up.username, up.account, cfg.pacing)


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(t))
