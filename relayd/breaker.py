"""One upstream's health, as a state machine: the single owner of "may relayd use it now?".

    ok ──failure_threshold connection-level failures──▶ open ──cooldown──▶ half_open
    half_open ──the one probe session succeeds──▶ ok      (fails ──▶ open, longer cooldown)
    any ──pause(until)──▶ paused ──until──▶ half_open      (the provider's quota, issue rules)
    any ──reauth(reason)──▶ reauth ──cooldown──▶ half_open (wrong credentials; a reload clears it)
    ok ──throttle(reason, until)──▶ throttled (usable, slower) ──until──▶ ok

Only connection-level failures count (dns, connect, tls, banner, ehlo, token, auth): a reply
about one message is that message's outcome, never the upstream's. The cooldown of an open upstream
doubles with each failed probe, as a message's retry delay does, up to max_cooldown. Every
change is one log line (``upstream.state_changed``), so an outage is one line, not one per
message. Pure and synchronous: the clock is passed in, nothing here awaits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import structlog

log = structlog.get_logger()

# The steps of a session before any message is in it: a failure there is the upstream's.
CONNECTION_STEPS = frozenset({"dns", "connect", "tls", "banner", "ehlo", "token", "auth"})
PROBE_TIMEOUT = 60.0  # seconds a claimed probe may run before another worker may probe


class UpstreamState(StrEnum):
    OK = "ok"
    OPEN = "open"
    HALF_OPEN = "half_open"
    PAUSED = "paused"
    THROTTLED = "throttled"
    REAUTH = "reauth"


# The states that are not tried until their time comes (then one probe decides).
_WAITING = frozenset({UpstreamState.OPEN, UpstreamState.PAUSED, UpstreamState.REAUTH})


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """What health, /readyz and metrics show about one upstream."""

    name: str
    state: UpstreamState
    reason: str
    failures: int
    next_probe_at: float | None
    since: float

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": str(self.state),
            "reason": self.reason,
            "failures": self.failures,
            "next_probe_at": self.next_probe_at,
            "since": self.since,
        }


class Breaker:
    """The circuit breaker of one upstream (see the module docstring for the states)."""

    def __init__(
        self,
        name: str,
        failure_threshold: int = 3,
        cooldown: float = 60.0,
        max_cooldown: float = 3600.0,
        clock: Callable[[], float] | None = None,
        on_change: Callable[[Breaker], None] | None = None,
    ) -> None:
        import time

        self.name = name
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self.max_cooldown = max_cooldown
        self.clock = clock or time.time
        self.on_change = on_change
        self.state = UpstreamState.OK
        self.reason = ""
        self.failures = 0  # connection-level failures in a row
        self.opened = 0  # times opened in a row without a success: the cooldown's exponent
        self.until: float | None = None  # end of open/paused/reauth/throttled
        self.probe_started: float | None = None
        self.since = self.clock()

    def __repr__(self) -> str:
        return f"<Breaker {self.name} {self.state}>"

    # -- questions ----------------------------------------------------------------------------

    def usable(self, now: float | None = None) -> bool:
        """Whether a message may be given to this upstream now (a probe may be due)."""
        now = self.clock() if now is None else now
        if self.state in (UpstreamState.OK, UpstreamState.THROTTLED):
            return True
        if self.state == UpstreamState.HALF_OPEN:
            return not self._probing(now)
        return self.until is not None and now >= self.until

    @property
    def next_probe_at(self) -> float | None:
        """When a waiting upstream is tried again (None when it is usable or being probed)."""
        if self.state in _WAITING:
            return self.until
        if self.state == UpstreamState.HALF_OPEN and self.probe_started is not None:
            return self.probe_started + PROBE_TIMEOUT
        return None

    def snapshot(self) -> BreakerSnapshot:
        return BreakerSnapshot(
            self.name, self.state, self.reason, self.failures, self.next_probe_at, self.since
        )

    # -- a session is about to start --------------------------------------------------------

    def admit(self, now: float | None = None) -> bool:
        """Claim the right to open a session: always when ok, once per half-open (the probe)."""
        now = self.clock() if now is None else now
        if self.state == UpstreamState.THROTTLED and self.until is not None and now >= self.until:
            self._change(UpstreamState.OK, "throttle ended", None)
        if self.state in (UpstreamState.OK, UpstreamState.THROTTLED):
            return True
        if self.state in _WAITING:
            if self.until is None or now < self.until:
                return False
            self._change(UpstreamState.HALF_OPEN, f"probing after: {self.reason}", None)
        if self._probing(now):
            return False
        self.probe_started = now
        return True

    def _probing(self, now: float) -> bool:
        return self.probe_started is not None and now - self.probe_started < PROBE_TIMEOUT

    # -- what happened ----------------------------------------------------------------------

    def record_success(self) -> None:
        """A session reached the state where it can carry mail: the upstream works."""
        self.failures = 0
        self.opened = 0
        self.probe_started = None
        if self.state not in (UpstreamState.OK, UpstreamState.THROTTLED):
            self._change(UpstreamState.OK, "", None)

    def record_failure(self, reason: str, step: str = "connect") -> None:
        """A connection-level failure; the threshold-th in a row (or a failed probe) opens it."""
        if step not in CONNECTION_STEPS:
            return  # the message's outcome, not the upstream's
        now = self.clock()
        self.failures += 1
        probing = self.state == UpstreamState.HALF_OPEN
        self.probe_started = None
        if self.state in _WAITING:
            return  # already waiting (a session that started before it opened)
        if probing or self.failures >= self.failure_threshold:
            self.opened += 1
            self._change(UpstreamState.OPEN, reason, now + self._cooldown())

    def _cooldown(self) -> float:
        return min(self.max_cooldown, self.cooldown * 2.0 ** max(0, self.opened - 1))

    def pause(self, until: float, reason: str) -> None:
        """The provider said "not now" for the account (a quota): not used until `until`."""
        self.probe_started = None
        self._change(UpstreamState.PAUSED, reason, until)

    def throttle(self, reason: str, until: float) -> None:
        """Usable, but slower until `until` (the pacing module decides how much slower)."""
        if self.state in (UpstreamState.OK, UpstreamState.THROTTLED):
            self._change(UpstreamState.THROTTLED, reason, until)

    def reauth(self, reason: str) -> None:
        """The credentials were refused: open until a reload (reset) or a successful probe."""
        self.opened += 1
        self.probe_started = None
        self._change(UpstreamState.REAUTH, reason, self.clock() + self._cooldown())

    def reset(self) -> None:
        """The upstream's config changed (SIGHUP): forget its past and try it again."""
        self.failures = 0
        self.opened = 0
        self.probe_started = None
        if self.state != UpstreamState.OK:
            self._change(UpstreamState.OK, "config reloaded", None)

    def _change(self, state: UpstreamState, reason: str, until: float | None) -> None:
        previous = self.state
        self.until = until
        if state == previous:
            self.reason = reason  # a later deadline for the same state: not a change
            return
        self.state, self.reason, self.since = state, reason, self.clock()
        level = log.info if state in (UpstreamState.OK, UpstreamState.HALF_OPEN) else log.warning
        if state == UpstreamState.REAUTH:
            level = log.error  # an operator has to act
        level(
            "upstream.state_changed",
            upstream=self.name,
            state=str(state),
            previous=str(previous),
            reason=reason,
            failures=self.failures,
            **({"next_probe_in": round(until - self.since, 3)} if until is not None else {}),
        )
        if self.on_change is not None:
            self.on_change(self)
