"""Limits shared through a real redis-server: one rate, one daily count, one lease set."""

from __future__ import annotations

from typing import Any

import pytest
from structlog.testing import capture_logs

from relayd import pacing
from relayd.fleet import SharedLimiter
from relayd.pacing import Limits


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def limiter(server: Any, limits: Limits, fleet: int = 2, clock: Any = None) -> SharedLimiter:
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(server.url, socket_timeout=1, socket_connect_timeout=1)
    return SharedLimiter(
        client, "smtp.example.com app@example.com", limits, fleet, clock or Clock()
    )


async def test_two_relayds_draw_from_one_rate(redis_server: Any) -> None:
    """1/minute with burst 2: A takes both slots, B is told to wait for the rate."""
    limits = Limits.of("1/minute", burst=2)
    a, b = limiter(redis_server, limits), limiter(redis_server, limits)
    assert await a.acquire() is None and await a.acquire() is None
    wait = await b.acquire()
    assert wait is not None and wait.limit == "rate"
    assert 0.9 * limits.interval < wait.seconds <= limits.interval
    await a.close()
    await b.close()


async def test_two_relayds_share_one_daily_count(redis_server: Any) -> None:
    """daily 3 (recipients): 2 through A and 1 through B use it up for both."""
    limits = Limits.of(daily=3, unit="recipients")
    a, b = limiter(redis_server, limits), limiter(redis_server, limits)
    assert await a.acquire(2) is None
    assert await b.acquire(1) is None
    wait = await b.acquire(1)
    assert wait is not None and wait.limit == "daily" and wait.seconds > 86_000
    assert (await a.refresh())["sent_today"] == 3
    await a.close()
    await b.close()


async def test_connection_leases_are_counted_across_relayds(redis_server: Any) -> None:
    """max_connections 2 shared: A and B hold one each; A's second waits for a release."""
    limits = Limits.of(connections=2)
    a, b = limiter(redis_server, limits), limiter(redis_server, limits)
    assert await a.lease("a1") and await b.lease("b1")
    assert not await a.lease("a2")
    await b.release("b1")
    assert await a.lease("a2")
    await a.close()
    await b.close()


async def test_a_throttle_slows_the_whole_fleet(redis_server: Any) -> None:
    """A throttle reported by A halves the rate B sees."""
    limits = Limits.of("60/second")
    a, b = limiter(redis_server, limits), limiter(redis_server, limits)
    await a.throttle("rate", 30.0)
    state = await b.refresh()
    assert state["rate_per_second"] == pytest.approx(30.0 * pacing.MARGIN)
    assert state["throttled_until"]
    await a.close()
    await b.close()


async def test_redis_gone_falls_back_to_a_share_and_rejoins(redis_server: Any) -> None:
    """Redis stopped: the local share (its burst spent, so the switch adds none), logged once;
    back: shared again, what went meanwhile added to the shared count, no burst on rejoining."""
    clock = Clock()
    limits = Limits.of("1/minute", burst=4, daily=100)
    a = limiter(redis_server, limits, fleet=2, clock=clock)
    assert await a.acquire() is None
    redis_server.stop()
    with capture_logs() as logs:
        first = await a.acquire()
        assert first is not None and first.limit == "rate"
        clock.now += first.seconds
        assert await a.acquire() is None  # one at the local share's pace
        assert await a.acquire() is not None
    assert [e["event"] for e in logs].count("pacing.fallback") == 1
    assert a.state()["backend"] == "fallback"
    redis_server.start()  # empty: no persistence
    clock.now += 120.0  # past the probe backoff
    with capture_logs() as logs:
        after = await a.acquire()
    assert [e["event"] for e in logs] == ["pacing.rejoined"]
    assert after is not None and after.limit == "rate"
    state = await a.refresh()
    assert state["backend"] == "redis" and state["sent_today"] == 1
    await a.close()


async def test_a_wrong_redis_password_falls_back_without_showing_it(redis_with_password):
    """Redis refusing the password is Redis out of reach: the local share, one warning."""
    from relayd.fleet import SharedLimiter

    lim = SharedLimiter.connect(
        redis_with_password.url, "not-the-password", "acct", Limits.of("1/minute"), 2
    )
    with capture_logs() as logs:
        await lim.acquire()
    assert lim.state()["backend"] == "fallback"
    assert [e["event"] for e in logs] == ["pacing.fallback"]
    assert "not-the-password" not in repr(logs)
    await lim.close()


async def test_a_redis_restart_between_calls_is_not_an_outage(redis_server: Any) -> None:
    """Pooled connections the old server closed are replaced: no fallback, no log line."""
    import asyncio

    a = limiter(redis_server, Limits.of("60/second"))
    await asyncio.gather(a.refresh(), a.refresh(), a.refresh())  # several pooled connections
    redis_server.stop()
    redis_server.start()
    with capture_logs() as logs:
        for _ in range(3):
            assert (await a.refresh())["backend"] == "redis"
    assert logs == []
    await a.close()


async def test_redis_password_from_file_is_used_and_never_shown(redis_with_password, tmp_path):
    """pacing.redis_password_file: the limiter authenticates; the config's repr hides it."""
    from conftest import REDIS_PASSWORD

    from relayd import config as config_mod
    from relayd.provider import limiter_for

    secret = tmp_path / "redis.pass"
    secret.write_text(REDIS_PASSWORD + "\n")
    cfg = config_mod.load(
        None,
        {
            "RELAYD_UPSTREAM_HOST": "smtp.example.com",
            "RELAYD_UPSTREAM_RATE": "1/minute",
            "RELAYD_PACING_REDIS": redis_with_password.url,
            "RELAYD_PACING_REDIS_PASSWORD_FILE": str(secret),
            "RELAYD_SPOOL_PATH": str(tmp_path / "spool"),
        },
    )
    assert REDIS_PASSWORD not in repr(cfg)
    lim = limiter_for(cfg, Clock())
    with capture_logs() as logs:
        assert await lim.acquire() is None
        state = await lim.refresh()  # type: ignore[attr-defined]
    assert state["backend"] == "redis" and state["sent_today"] == 1
    assert logs == []
    await lim.close()  # type: ignore[attr-defined]
