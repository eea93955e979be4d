"""The local limiter's logic against a fake clock (the clock is what a test cannot cause)."""

from __future__ import annotations

import pytest

from relayd import pacing
from relayd.pacing import DAY, Limits, LocalLimiter, Wait


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def sends_in(times: list[float], window: float) -> int:
    """The most sends any window of that length holds."""
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def drive(lim: LocalLimiter, clock: Clock, messages: int) -> list[float]:
    """Send as fast as the limiter allows, sleeping (on the fake clock) as told."""
    times = []
    while len(times) < messages:
        wait = lim.take()
        if wait is None:
            times.append(clock.now)
        else:
            clock.now += wait.seconds
    return times


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30/minute", (30, 60.0)),
        ("14/second", (14, 1.0)),
        ("1000/hour", (1000, 3600.0)),
        ("2000/day", (2000, DAY)),
        ("30 / min", (30, 60.0)),
        ("5/seconds", (5, 1.0)),
    ],
)
def test_rates_parse(text: str, expected: tuple[int, float]) -> None:
    """The accepted spellings of a rate."""
    assert pacing.parse_rate(text) == expected


@pytest.mark.parametrize("text", ["30", "30/fortnight", "0/minute", "-1/second", "fast"])
def test_bad_rates_are_refused(text: str) -> None:
    """A rate that is not N/period says what is expected."""
    with pytest.raises(ValueError, match="30/minute"):
        pacing.parse_rate(text)


@pytest.mark.parametrize("burst", [1, 5, 20])
def test_gcra_never_exceeds_burst_plus_rate_in_any_window(burst: int) -> None:
    """300/minute: no 60 s window holds more than burst + 300, and the mean rate is the limit."""
    clock = Clock()
    lim = LocalLimiter(Limits.of("300/minute", burst=burst), clock)
    times = drive(lim, clock, 1500)
    assert sends_in(times, 60.0) <= burst + 300
    mean = (len(times) - burst) / (times[-1] - times[0])
    assert mean == pytest.approx(5.0 * pacing.MARGIN, rel=0.001)


def test_first_burst_goes_at_once_then_one_per_interval() -> None:
    """From idle, burst messages go without waiting; the next waits one interval."""
    clock = Clock()
    lim = LocalLimiter(Limits.of("60/minute", burst=3), clock)
    assert [lim.take() for _ in range(3)] == [None, None, None]
    wait = lim.take()
    assert wait == Wait(pytest.approx(1.0 / pacing.MARGIN), "rate")


def test_a_refused_acquire_takes_nothing() -> None:
    """Asking again and again while told to wait does not push the next slot further."""
    clock = Clock()
    lim = LocalLimiter(Limits.of("1/second"), clock)
    assert lim.take() is None
    for _ in range(10):
        assert lim.take() is not None
    clock.now += lim.limits.interval
    assert lim.take() is None


def test_throttle_halves_the_rate_for_its_duration() -> None:
    """After throttle(rate) the interval doubles; after its seconds the rate is back."""
    clock = Clock()
    lim = LocalLimiter(Limits.of("60/minute"), clock)
    step = lim.limits.interval
    assert lim.take() is None
    clock.now += step
    assert lim.take() is None
    pacing_throttle(lim, "rate", 30.0)
    assert lim.state()["throttled_until"] == clock.now + 30.0
    clock.now += step
    assert lim.take() is None  # the slot already earned at the old rate
    wait = lim.take()
    assert wait is not None and wait.seconds == pytest.approx(2 * step)
    clock.now += 40.0
    assert lim.take() is None
    clock.now += step
    assert lim.take() is None


def pacing_throttle(lim: LocalLimiter, limit: str, seconds: float) -> None:
    import asyncio

    asyncio.run(lim.throttle(limit, seconds))


def test_rolling_daily_quota_waits_until_the_oldest_send_ages_out() -> None:
    """3 a day, rolling: the 4th waits until 24 h after the 1st."""
    clock = Clock()
    lim = LocalLimiter(Limits.of(daily=3), clock)
    first = clock.now
    for _ in range(3):
        assert lim.take() is None
        clock.now += 100.0
    wait = lim.take()
    assert wait == Wait(pytest.approx(first + DAY - clock.now), "daily")
    clock.now = first + DAY
    assert lim.take() is None
    assert lim.state()["sent_today"] == 3


def test_daily_quota_in_recipients_counts_each_recipient() -> None:
    """daily_unit recipients: a 3-recipient message uses 3 of 10."""
    clock = Clock()
    lim = LocalLimiter(Limits.of(daily=10, unit="recipients"), clock)
    assert lim.take(3) is None and lim.take(3) is None and lim.take(3) is None
    assert lim.take(3) is not None
    assert lim.take(1) is None
    assert lim.state()["sent_today"] == 10


def test_calendar_daily_quota_starts_again_at_utc_midnight() -> None:
    """daily_window calendar: the quota is back at 00:00 UTC, not 24 h after the first send."""
    clock = Clock(DAY * 20 + DAY - 60.0)  # 23:59 UTC
    lim = LocalLimiter(Limits.of(daily=1, window="calendar"), clock)
    assert lim.take() is None
    wait = lim.take()
    assert wait == Wait(pytest.approx(60.0), "daily")
    clock.now += 60.0
    assert lim.take() is None


def test_connection_leases_stop_at_the_limit_and_free_on_release() -> None:
    """3 connections: the 4th lease is refused until one is released."""
    import asyncio

    lim = LocalLimiter(Limits.of(connections=3), Clock())

    async def go() -> list[bool]:
        got = [await lim.lease(f"s{i}") for i in range(4)]
        await lim.release("s0")
        return [*got, await lim.lease("s3")]

    assert asyncio.run(go()) == [True, True, True, False, True]


def test_connection_throttle_uses_one_fewer_than_open() -> None:
    """A 432 with 3 sessions open: 2 may be held until the throttle ends."""
    import asyncio

    clock = Clock()
    lim = LocalLimiter(Limits.of(connections=3), clock)

    async def go() -> list[bool]:
        for i in range(3):
            await lim.lease(f"s{i}")
        await lim.throttle("connections", 60.0)
        await lim.release("s0")
        await lim.release("s1")
        got = [await lim.lease("a"), await lim.lease("b")]
        clock.now += 61.0
        return [*got, await lim.lease("c")]

    assert asyncio.run(go()) == [True, False, True]


def test_share_divides_each_limit_by_the_fleet() -> None:
    """fleet_size 4: a quarter of the rate, daily and connections, never below one."""
    lim = Limits.of("120/minute", burst=8, daily=2000, connections=3).share(4)
    assert (lim.count, lim.burst, lim.daily, lim.connections) == (30, 2, 500, 1)
