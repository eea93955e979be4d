"""The upstreams a relay delivers through: per upstream a work queue, a breaker and workers.

Each upstream has its own queue, its own max_connections workers, each owning at most one
pooled session (one per upstream and credential; a reload retires them), and its own
provider.Provider: its reply rules (by its preset) and its limiter (rate, daily, leases). A
due message is put on the queue of the first usable upstream of its route; a worker whose
upstream fails before a message is in the session (dns … auth) hands the same flight on to the
next one at once. The pool is bookkeeping only: the relay's workers do the network and the spool.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from relayd import config as config_mod
from relayd import rewrite, routes
from relayd.breaker import PROBE_TIMEOUT, Breaker, UpstreamState
from relayd.config import Config, UpstreamConfig
from relayd.envelope import Envelope
from relayd.errors import UpstreamError
from relayd.provider import Provider

# Keys whose change makes an upstream a different one: its breaker starts afresh (a reauth
# waits for exactly this) and its sessions are retired.
_IDENTITY = (
    "host",
    "port",
    "tls",
    "verify",
    "ca_file",
    "username",
    "password",
    "preset",
    "auth",
    "oauth2",
)


@dataclass(slots=True)
class Flight:
    """One attempt of one message, moving along its route until an upstream takes it."""

    msg_id: str
    via: tuple[str, ...] = ()  # the route's upstreams, in order (a guess until env is loaded)
    env: Envelope | None = None
    data: bytes = b""
    failed: list[tuple[str, UpstreamError]] = field(default_factory=list)
    passed: set[str] = field(default_factory=set)  # skipped without trying (busy, paused)
    slot: str = ""  # the upstream whose pacing granted this flight its slot

    def skip(self) -> set[str]:
        return self.passed | {name for name, _ in self.failed}


@dataclass(eq=False, slots=True)
class Upstream:
    """One configured upstream at run time."""

    cfg: UpstreamConfig
    breaker: Breaker
    provider: Provider
    queue: asyncio.Queue[Flight | None] = field(default_factory=asyncio.Queue)
    workers: list[asyncio.Task[None]] = field(default_factory=list)
    removed: bool = False
    # A recovering upstream gets one flight, its probe; others wait for its verdict. Held
    # until the flight reaches a worker (or PROBE_TIMEOUT passes, should it never).
    probe_sent_until: float = 0.0
    idle: int = 0  # workers waiting on the queue: pacing hands out a slot only to one of them
    resting: bool = False  # paused or reauth by a provider's reply, until it takes mail again

    @property
    def name(self) -> str:
        return self.cfg.name


class Pool:
    """The upstreams by name, in config order, and the routing table over them."""

    def __init__(
        self,
        cfg: Config,
        clock: Callable[[], float],
        on_change: Callable[[Breaker], None] | None = None,
    ) -> None:
        self.clock = clock
        self.on_change = on_change
        self.upstreams: dict[str, Upstream] = {}
        self.table = routes.from_config(cfg)
        for up in cfg.upstreams:
            self.upstreams[up.name] = self._upstream(cfg, up)

    def _upstream(self, cfg: Config, up: UpstreamConfig) -> Upstream:
        return Upstream(up, self._breaker(cfg, up), Provider(cfg, self.clock, up))

    def _breaker(self, cfg: Config, up: UpstreamConfig) -> Breaker:
        return Breaker(
            up.name,
            up.failure_threshold,
            up.cooldown or cfg.retry.initial_delay,
            up.max_cooldown or max(cfg.retry.max_delay, up.cooldown),
            self.clock,
            self.on_change,
        )

    def reconfigure(self, cfg: Config) -> list[Upstream]:
        """Apply a reloaded config; returns the upstreams it no longer has."""
        self.table = routes.from_config(cfg)
        old = self.upstreams
        self.upstreams = {}
        for up in cfg.upstreams:
            current = old.pop(up.name, None)
            if current is None:
                current = self._upstream(cfg, up)
            else:
                current.provider.configure(cfg, up)
                fresh = self._breaker(cfg, up)
                b = current.breaker
                b.failure_threshold, b.cooldown = fresh.failure_threshold, fresh.cooldown
                b.max_cooldown = fresh.max_cooldown
                if any(getattr(up, k) != getattr(current.cfg, k) for k in _IDENTITY):
                    b.reset()
                current.cfg = up
            self.upstreams[up.name] = current
        for gone in old.values():
            gone.removed = True
        return list(old.values())

    def decide(self, env: Envelope, header_from: str | None) -> routes.Decision:
        return self.table.decide(env.mail_from, header_from)

    def guess(self, sender: str) -> tuple[str, ...]:
        """The upstreams a sender's mail most likely uses, before its header From is read."""
        decision = self.table.decide(sender, None)
        return decision.via if decision.via else tuple(self.upstreams)

    def pick(self, via: tuple[str, ...], skip: set[str], now: float) -> Upstream | None:
        """The first upstream of via that may take a flight now (a recovering one: one flight).

        Not a pure query: picking a recovering upstream sends it its probe, so that at the end
        of a cooldown one message is loaded and tried, not the whole backlog.
        """
        for name in via:
            up = self.upstreams.get(name)
            if up is None or name in skip or not up.breaker.usable(now):
                continue
            if up.breaker.state in (UpstreamState.OK, UpstreamState.THROTTLED):
                return up
            if now >= up.probe_sent_until:
                up.probe_sent_until = now + PROBE_TIMEOUT
                return up
        return None

    def next_probe(self, via: tuple[str, ...]) -> float | None:
        """The soonest time one of these upstreams may be tried again."""
        times = [
            t
            for name in via
            if (up := self.upstreams.get(name)) is not None
            and (t := up.breaker.next_probe_at) is not None
        ]
        return min(times) if times else None

    def snapshots(self) -> tuple[dict[str, object], ...]:
        return tuple(snapshot(up) for up in self.upstreams.values())


def snapshot(up: Upstream) -> dict[str, object]:
    """One upstream for health and metrics: its breaker's state, then its pacing."""
    b = up.breaker
    state = b.state
    pace = up.provider.snapshot()
    if state == UpstreamState.OK and pace.get("throttled_until"):
        state = UpstreamState.THROTTLED  # the limiter's throttle outlasts the breaker's note
    return {
        **pace,
        **b.snapshot().to_json(),
        "state": str(state),
        "label": up.provider.name,
        "paused_until": b.until if b.state == UpstreamState.PAUSED else None,
        "reauth": b.state == UpstreamState.REAUTH,
    }


def usable_state(doc: dict[str, object], now: float) -> bool:
    """Whether an upstream's snapshot (as in status.json) says it may be used now."""
    state = doc.get("state")
    if state in (UpstreamState.OK, UpstreamState.THROTTLED, UpstreamState.HALF_OPEN):
        return True
    probe = doc.get("next_probe_at")
    return isinstance(probe, int | float) and probe <= now


def trail(flight: Flight, used: str) -> dict[str, Any]:
    """The history fields naming the upstream used and those failed over from."""
    trail: dict[str, Any] = {"upstream": used} if used else {}
    failed = flight.failed
    earlier = failed[:-1] if failed and failed[-1][0] == used else failed
    if earlier:
        trail["failover"] = [
            {"upstream": n, "step": e.step, "code": e.code, "text": e.text or str(e)}
            for n, e in earlier
        ]
    return trail


def shape(
    up: Upstream, env: Envelope, data: bytes, bound: Any
) -> tuple[str, bytes, dict[str, Any]]:
    """Sender and message as this upstream gets them (from_policy), and what to record."""
    if up.cfg.from_policy != "rewrite":
        return env.mail_from, data, {}
    account = config_mod.rewrite_address(up.cfg)
    if rewrite.header_from(data).lower() == account.lower():
        return env.mail_from, data, {}  # already the account: nothing to rewrite
    if rewrite.signed(data) and not up.cfg.rewrite_signed:
        bound.info(
            "message.rewrite_skipped",
            reason="DKIM-Signature present (rewrite_signed: true would break it)",
        )
        return env.mail_from, data, {}
    data, original = rewrite.rewrite_from(data, account)
    # A bounce keeps its empty reverse-path (RFC 5321 §4.5.5): replies to it must not loop.
    sender = account if env.mail_from else ""
    bound.info("message.from_rewritten", sent_as=account, original_from=original)
    return sender, data, {"sent_as": account}
