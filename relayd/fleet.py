"""One account's limits shared by every relayd that sends through it, kept in Redis.

Each decision is one Lua script run atomically on the Redis server with Redis' own clock
(``TIME``), so ten relayds on ten machines with skewed clocks draw from one GCRA TAT, one daily
count and one connection set. When Redis cannot be reached relayd does not stop sending: it
falls back to a local limiter at 1/fleet_size of each limit, says so once in the log, in
``state()`` (health) and a metric, and rejoins when a probe (with backoff) succeeds.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis.asyncio
import redis.exceptions
import structlog

from relayd.pacing import UNPACED_INTERVAL, Limits, LocalLimiter, Wait

log = structlog.get_logger()

TIMEOUT = 1.0  # seconds one Redis call may take before this relayd counts Redis as gone
LEASE_TTL = 120.0  # a session's lease outlives a crashed holder by at most this long
KEEP = 2 * 86_400  # keys outlive a quiet day
PROBE_MAX = 60.0

# KEYS: pace hash, rolling-day sorted set, connection sorted set.
# ARGV: mode, interval, burst, daily, cost, window (rolling|calendar), member, connections,
#       seconds (throttle), limit (throttle: rate|connections), key expiry, lease expiry,
#       the interval of a throttled upstream that has no rate.
SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local mode, interval, burst = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local daily, cost, window, member = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], ARGV[7]
local conns = tonumber(ARGV[8])
local h = redis.call('HMGET', KEYS[1], 'tat', 'slow', 'slow_until', 'total', 'day', 'count',
                     'cap', 'cap_until')
local tat, slow, slow_until = tonumber(h[1]) or 0, tonumber(h[2]) or 1, tonumber(h[3]) or 0
local total, day, count = tonumber(h[4]) or 0, tonumber(h[5]) or -1, tonumber(h[6]) or 0
local cap, cap_until = tonumber(h[7]) or 0, tonumber(h[8]) or 0
if now >= slow_until then slow = 1 end
local today = math.floor(now / 86400)
if day ~= today then day = today; count = 0 end
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - 86400)
for _, m in ipairs(old) do total = total - tonumber(string.match(m, ':(%d+)$')) end
if #old > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 86400) end
if total < 0 then total = 0 end
redis.call('HSET', KEYS[1], 'total', total, 'day', day, 'count', count)
redis.call('EXPIRE', KEYS[1], ARGV[11])
local rolling = daily > 0 and window == 'rolling'
local sent = count
if rolling then sent = total end
if mode == 'state' then
  local rate = 0
  if interval > 0 then rate = 1 / (interval * slow) end
  return {tostring(sent), tostring(rate), tostring(slow > 1 and slow_until or 0),
          tostring(redis.call('ZCOUNT', KEYS[3], now, '+inf'))}
end
if mode == 'throttle' then
  if ARGV[10] == 'connections' then
    local held = redis.call('ZCOUNT', KEYS[3], now, '+inf')
    redis.call('HSET', KEYS[1], 'cap', math.max(1, held - 1), 'cap_until', now + tonumber(ARGV[9]))
  else
    redis.call('HSET', KEYS[1], 'slow', math.min(16, slow * 2), 'slow_until',
               now + tonumber(ARGV[9]))
  end
  return {'1', '0', ''}
end
if mode == 'rejoin' then
  if interval > 0 then redis.call('HSET', KEYS[1], 'tat', math.max(tat, now + interval * burst)) end
  if cost > 0 then
    redis.call('HSET', KEYS[1], 'count', count + cost)
    if rolling then
      redis.call('ZADD', KEYS[2], now, member .. ':' .. cost)
      redis.call('HINCRBY', KEYS[1], 'total', cost)
      redis.call('EXPIRE', KEYS[2], ARGV[11])
    end
  end
  return {'1', '0', ''}
end
if mode == 'lease' or mode == 'release' then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if mode == 'release' then redis.call('ZREM', KEYS[3], member); return {'1', '0', ''} end
  local limit = conns
  if now < cap_until then
    if limit > 0 then limit = math.min(limit, cap) else limit = cap end
  end
  local mine = redis.call('ZSCORE', KEYS[3], member)
  if (not mine) and limit > 0 and redis.call('ZCARD', KEYS[3]) >= limit then
    return {'0', '0', 'connections'}
  end
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[12]), member)
  redis.call('EXPIRE', KEYS[3], ARGV[11])
  return {'1', '0', ''}
end
local wait, limit = 0, ''
if daily > 0 then
  local c = math.min(cost, daily)
  if window == 'calendar' then
    if count + c > daily then wait = (today + 1) * 86400 - now; limit = 'daily' end
  elseif total + c > daily then
    local need = total + c - daily
    local rows = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
    for i = 1, #rows, 2 do
      need = need - tonumber(string.match(rows[i], ':(%d+)$'))
      if need <= 0 then wait = tonumber(rows[i + 1]) + 86400 - now; limit = 'daily'; break end
    end
  end
end
local new_tat = tat
if interval > 0 or slow > 1 then
  local iv = interval * slow
  if interval == 0 then iv = tonumber(ARGV[13]) * slow end
  new_tat = math.max(tat, now) + iv
  local allow_at = new_tat - iv * burst
  if allow_at > now and allow_at - now > wait then wait = allow_at - now; limit = 'rate' end
end
if wait > 0 then return {'0', tostring(wait), limit} end
redis.call('HSET', KEYS[1], 'tat', new_tat, 'count', count + cost)
if rolling then
  redis.call('ZADD', KEYS[2], now, member .. ':' .. cost)
  redis.call('HINCRBY', KEYS[1], 'total', cost)
  redis.call('EXPIRE', KEYS[2], ARGV[11])
end
return {'1', '0', ''}
"""


class SharedLimiter:
    """The Limiter of relayd.pacing, kept in Redis for a fleet; falls back to 1/fleet_size."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        account: str,
        limits: Limits,
        fleet_size: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.account = account
        self.limits = limits
        self.keys = [f"relayd:{{{account}}}:{part}" for part in ("pace", "day", "conn")]
        self.script = client.register_script(SCRIPT)
        self.fleet_size = fleet_size
        self.local = LocalLimiter(limits.share(fleet_size), clock)
        self.clock = clock
        self.shared = True
        self.next_probe = 0.0
        self.probe_delay = 1.0
        self.unsynced = 0  # daily cost sent on the local share, added to Redis on rejoining
        self.last_state: dict[str, Any] = {}

    @classmethod
    def connect(
        cls, url: str, password: str, account: str, limits: Limits, fleet: int
    ) -> SharedLimiter:
        kwargs: dict[str, Any] = {"socket_timeout": TIMEOUT, "socket_connect_timeout": TIMEOUT}
        if password:
            kwargs["password"] = password
        return cls(redis.asyncio.Redis.from_url(url, **kwargs), account, limits, fleet)

    async def _run(self, mode: str, **kw: Any) -> list[str] | None:
        """The script's answer, or None when Redis is out of reach (and the fallback is on)."""
        if not self.shared:
            if self.clock() < self.next_probe:
                return None
            # Back: what was sent meanwhile joins the shared daily count, and the shared TAT
            # starts no earlier than a full burst from now (it is 30 s stale after 30 s away).
            if await self._call("rejoin", cost=self.unsynced) is None:
                return None
            self.shared, self.unsynced = True, 0
            log.info("pacing.rejoined", account=self.account)
        return await self._call(mode, **kw)

    async def _call(self, mode: str, **kw: Any) -> list[str] | None:
        lim = self.limits
        args = [mode, lim.interval, lim.burst, lim.daily, kw.get("cost", 1), lim.daily_window,
                kw.get("member", uuid.uuid4().hex), lim.connections, kw.get("seconds", 0),
                kw.get("limit", "rate"), KEEP, LEASE_TTL, UNPACED_INTERVAL]  # fmt: skip
        # Twice while shared: after a Redis restart the first call meets a pooled connection
        # the old server closed; the pool drops it and the second call opens a fresh one.
        for last in (not self.shared, True):
            try:
                async with asyncio.timeout(TIMEOUT):
                    reply = await self.script(keys=self.keys, args=args)
                break
            except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
                if last:
                    self._lost(exc)
                    return None
        return [v.decode() if isinstance(v, bytes) else str(v) for v in reply]

    def _lost(self, exc: BaseException) -> None:
        if self.shared:
            self.shared = False
            self.probe_delay = 1.0
            # The shared bucket was in use: the local share starts with its burst spent, so
            # the switch adds no burst on top of what the fleet just sent.
            self.local.spend_burst()
            log.warning(
                "pacing.fallback",
                account=self.account,
                error=type(exc).__name__,
                detail=f"Redis unreachable: sending at 1/{self.fleet_size} of each limit",
            )
        else:
            self.probe_delay = min(PROBE_MAX, self.probe_delay * 2)
        self.next_probe = self.clock() + self.probe_delay

    async def acquire(self, recipients: int = 1) -> Wait | None:
        """As LocalLimiter.acquire, for the whole fleet at once."""
        reply = await self._run("acquire", cost=self.limits.cost(recipients))
        if reply is None:
            wait = self.local.take(recipients)
            if wait is None:
                self.unsynced += self.limits.cost(recipients)
            return wait
        return None if reply[0] == "1" else Wait(float(reply[1]), reply[2])

    async def lease(self, holder: str) -> bool:
        reply = await self._run("lease", member=holder)
        if reply is None:
            return await self.local.lease(holder)
        return reply[0] == "1"

    async def release(self, holder: str) -> None:
        await self.local.release(holder)
        await self._run("release", member=holder)

    async def throttle(self, limit: str, seconds: float) -> None:
        await self.local.throttle(limit, seconds)
        await self._run("throttle", limit=limit, seconds=seconds)

    async def refresh(self) -> dict[str, Any]:
        """Read the shared state (for health): today's count, rate in force, throttle."""
        reply = await self._run("state")
        if reply is None:
            self.last_state = {**self.local.state(), "backend": "fallback"}
            return self.last_state
        lim = self.limits
        self.last_state = {
            "backend": "redis",
            "sent_today": int(float(reply[0])),
            "daily": lim.daily,
            "rate": lim.describe(),
            "rate_per_second": round(float(reply[1]), 6) if lim.count else None,
            "throttled_until": float(reply[2]) or None,
            "connections_held": int(float(reply[3])),
        }
        return self.last_state

    def state(self) -> dict[str, Any]:
        if not self.shared:
            return {**self.local.state(), "backend": "fallback"}
        return self.last_state or {"backend": "redis", "rate": self.limits.describe()}

    async def close(self) -> None:
        await self.client.aclose()
