"""When the next message may go to an upstream: a GCRA rate, a daily quota, connection leases.

Every limiter answers ``await acquire(recipients)`` with None (go now: the slot is taken) or a
Wait (how long, and which limit); it never sleeps itself, so the relay decides what waits and
keeps the queue's order. GCRA (the generic cell rate algorithm) keeps one number per account,
the theoretical arrival time (TAT) of the next message: a message may go when ``TAT - now`` is
at most ``burst`` intervals, and then moves TAT one interval on. In any window of W seconds at
most ``burst + W / interval`` messages go, whatever the arrival pattern.

This module is the local limiter; relayd.fleet shares the same state through Redis.
"""

from __future__ import annotations

import collections
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

UNITS = ("messages", "recipients")
WINDOWS = ("rolling", "calendar")  # a 24 h sliding window | the UTC day
DAY = 86_400.0
MAX_SLOW = 16.0  # a rate is never throttled below 1/16 of its configured value
# relayd aims 1 % under a configured rate: a message's arrival at the provider is its slot plus
# the delivery's latency, and that varies (a fresh session's TLS and AUTH, a busy loop), so at
# the full rate a window could catch one message more than burst + rate (bench/pacing.py: 311
# of 310 at 300/minute). 1 % is 3 messages a minute there, more than that spread.
MARGIN = 0.99
# An upstream with no rate that says "slow down" gets one: this interval, doubled per throttle.
UNPACED_INTERVAL = 0.5
_PERIODS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
            "h": 3600.0, "hour": 3600.0, "d": DAY, "day": DAY}  # fmt: skip
_RATE = re.compile(r"^\s*(\d+)\s*/\s*([a-z]+?)s?\s*$")


def parse_rate(text: str) -> tuple[int, float]:
    """("30/minute") -> (30, 60.0); raise ValueError saying what is accepted."""
    m = _RATE.match(text.lower())
    if not m or m.group(2) not in _PERIODS or int(m.group(1)) < 1:
        raise ValueError(f'expected a rate like "30/minute" or "14/second", got {text!r}')
    return int(m.group(1)), _PERIODS[m.group(2)]


@dataclass(frozen=True, slots=True)
class Limits:
    """One account's limits; zero means no limit of that kind."""

    count: int = 0  # messages per period (rate)
    period: float = 0.0
    burst: int = 1
    daily: int = 0
    daily_unit: str = "messages"
    daily_window: str = "rolling"
    connections: int = 0

    @classmethod
    def of(cls, rate: str = "", burst: int = 1, daily: int = 0, unit: str = "messages",
           window: str = "rolling", connections: int = 0) -> Limits:  # fmt: skip
        count, period = parse_rate(rate) if rate else (0, 0.0)
        return cls(count, period, burst, daily, unit, window, connections)

    @property
    def interval(self) -> float:
        """Seconds between two messages (1 % under the rate); 0.0 when there is no rate."""
        return self.period / (self.count * MARGIN) if self.count else 0.0

    def share(self, n: int) -> Limits:
        """1/n of every limit (at least one of each), what one of n relayds may use alone."""
        if n <= 1:
            return self
        return replace(
            self,
            count=max(1, self.count // n) if self.count else 0,
            burst=max(1, self.burst // n),
            daily=max(1, self.daily // n) if self.daily else 0,
            connections=max(1, self.connections // n) if self.connections else 0,
        )

    def cost(self, recipients: int) -> int:
        """What one message counts against the daily quota."""
        return max(1, recipients) if self.daily_unit == "recipients" else 1

    def describe(self) -> str:
        what = f"{self.count}/{_period_name(self.period)}" if self.count else "no rate"
        return what + (f", {self.daily} {self.daily_unit}/day" if self.daily else "")


def _period_name(period: float) -> str:
    return {1.0: "second", 60.0: "minute", 3600.0: "hour", DAY: "day"}.get(period, f"{period}s")


@dataclass(frozen=True, slots=True)
class Wait:
    """Not now: ``seconds`` until ``limit`` (rate | daily | connections) may allow it."""

    seconds: float
    limit: str


def gcra(tat: float, now: float, interval: float, burst: int) -> tuple[float, float]:
    """(new TAT, 0.0) when a message may go now, else (unchanged TAT, seconds to wait)."""
    start = max(tat, now)
    new_tat = start + interval
    allow_at = new_tat - interval * burst
    if allow_at > now:
        return tat, allow_at - now
    return new_tat, 0.0


def day_end(now: float) -> float:
    """The end of the UTC day now is in: when a calendar-day quota starts again."""
    return (math.floor(now / DAY) + 1) * DAY


class Limiter(Protocol):
    """What the relay asks before each message and session; see LocalLimiter."""

    async def acquire(self, recipients: int = 1) -> Wait | None: ...
    async def lease(self, holder: str) -> bool: ...
    async def release(self, holder: str) -> None: ...
    async def throttle(self, limit: str, seconds: float) -> None: ...
    def state(self) -> dict[str, Any]: ...


class LocalLimiter:
    """The limits of one account, kept in this process (one relayd, or the Redis fallback)."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.time) -> None:
        self.limits = limits
        self.clock = clock
        self.tat = 0.0
        self.slow, self.slow_until = 1.0, 0.0
        self.conn_cap, self.conn_until = 0, 0.0
        self.holders: set[str] = set()
        # Rolling window: (time, cost) of each send in the last 24 h, and their sum.
        self.window: collections.deque[tuple[float, int]] = collections.deque()
        self.window_total = 0
        self.day, self.day_count = -1, 0  # calendar (UTC) day index and what it has sent

    async def acquire(self, recipients: int = 1) -> Wait | None:
        """Take a slot for one message now (None), or say how long until one is free."""
        return self.take(recipients)

    def take(self, recipients: int = 1) -> Wait | None:
        lim, now = self.limits, self.clock()
        wait = self._daily_wait(now, lim.cost(recipients))
        tat, rate_wait = self.tat, 0.0
        slow = self._slow(now)
        interval = (lim.interval or UNPACED_INTERVAL) * slow if lim.count or slow > 1 else 0.0
        if interval:
            tat, rate_wait = gcra(self.tat, now, interval, lim.burst)
        if wait or rate_wait:
            return Wait(wait, "daily") if wait >= rate_wait else Wait(rate_wait, "rate")
        self.tat = tat
        self._count(now, lim.cost(recipients))
        return None

    def spend_burst(self) -> None:
        """Start as if a full burst had just gone: the next message waits one interval."""
        lim = self.limits
        if lim.count:
            self.tat = max(self.tat, self.clock() + lim.interval * lim.burst)

    def _slow(self, now: float) -> float:
        return self.slow if now < self.slow_until else 1.0

    def _daily_wait(self, now: float, cost: int) -> float:
        lim = self.limits
        self._expire(now)
        if not lim.daily:
            return 0.0
        cost = min(cost, lim.daily)  # a message larger than the quota goes on an empty day
        if lim.daily_window == "calendar":
            return day_end(now) - now if self.day_count + cost > lim.daily else 0.0
        need = self.window_total + cost - lim.daily
        for at, n in self.window:
            if need <= 0:
                break
            need -= n
            if need <= 0:
                return at + DAY - now
        return 0.0

    def _expire(self, now: float) -> None:
        while self.window and self.window[0][0] <= now - DAY:
            self.window_total -= self.window.popleft()[1]
        if math.floor(now / DAY) != self.day:
            self.day, self.day_count = math.floor(now / DAY), 0

    def _count(self, now: float, cost: int) -> None:
        self.day_count += cost
        if self.limits.daily and self.limits.daily_window == "rolling":
            self.window.append((now, cost))
            self.window_total += cost

    async def lease(self, holder: str) -> bool:
        """Hold one of the account's connections (True), unless all are held."""
        cap = self._connections(self.clock())
        if holder not in self.holders and cap is not None and len(self.holders) >= cap:
            return False
        self.holders.add(holder)
        return True

    def _connections(self, now: float) -> int | None:
        cap = self.limits.connections or None
        if now < self.conn_until:
            cap = min(cap or self.conn_cap, self.conn_cap)
        return cap

    async def release(self, holder: str) -> None:
        self.holders.discard(holder)

    async def throttle(self, limit: str, seconds: float) -> None:
        """Halve the rate (limit=rate) or use one connection fewer for ``seconds``.

        Another throttle while one is in force halves again (down to 1/16), as a provider
        that keeps saying "slow down" means it.
        """
        now = self.clock()
        if limit == "connections":
            # The provider counted more sessions than it allows: one fewer than are open now.
            self.conn_cap = max(1, len(self.holders) - 1)
            self.conn_until = now + seconds
            return
        self.slow = min(MAX_SLOW, self._slow(now) * 2.0)
        self.slow_until = now + seconds

    def state(self) -> dict[str, Any]:
        """Today's count, the rate in force and any throttle, for health and metrics."""
        now = self.clock()
        self._expire(now)
        lim = self.limits
        rolling = lim.daily and lim.daily_window == "rolling"
        slow = self._slow(now)
        return {
            "backend": "local",
            "sent_today": self.window_total if rolling else self.day_count,
            "daily": lim.daily,
            "rate": lim.describe(),
            "rate_per_second": round(lim.count / lim.period / slow, 6) if lim.count else None,
            "throttled_until": self.slow_until if slow > 1.0 else None,
            "connections_held": len(self.holders),
        }
