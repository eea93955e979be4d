"""Whether an upstream may be used now: ok, paused (over a quota) or reauth (login refused).

A pause or reauth ends after its seconds; then one message probes (half-open) while the rest
wait, so a provider still over quota sees one refused message, not the whole queue. The probe's
success reopens the gate; another refusal closes it again. Each change is logged once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog

log = structlog.get_logger()

PROBE_WAIT = 1.0  # seconds the others re-check while one message probes


class Gate:
    """The usable-or-not state of one upstream, on the relay's clock."""

    def __init__(self, name: str, clock: Callable[[], float] = time.time) -> None:
        self.name = name
        self.clock = clock
        self.state = "ok"  # ok | paused | reauth
        self.until = 0.0
        self.reason = ""
        self.probing = False
        self.reauths = 0  # refusals of the login in a row, for the probe's backoff

    def closed_for(self) -> float:
        """0.0 when a message may go now (perhaps as the probe), else seconds to wait."""
        if self.state == "ok":
            return 0.0
        left = self.until - self.clock()
        if left > 0:
            return left
        return PROBE_WAIT if self.probing else 0.0

    def shut(self) -> float:
        """Seconds the upstream stays closed (0.0 once it may be probed or is ok)."""
        return max(0.0, self.until - self.clock()) if self.state != "ok" else 0.0

    def claim(self) -> bool:
        """Take the right to send one message now: always when ok, once as the probe."""
        if self.state == "ok":
            return True
        if self.probing or self.until > self.clock():
            return False
        self.probing = True
        return True

    def close(self, state: str, seconds: float, reason: str) -> float:
        """Pause (or mark reauth) for seconds; returns when the upstream may be tried again."""
        changed = state != self.state
        self.state, self.until, self.reason, self.probing = (
            state,
            self.clock() + seconds,
            reason,
            False,
        )
        self.reauths = self.reauths + 1 if state == "reauth" else 0
        if changed:
            event = "upstream.paused" if state == "paused" else "upstream.reauth_needed"
            # A refused login needs a person: logged at critical, which alerting pages on.
            level = log.warning if state == "paused" else log.critical
            level(event, upstream=self.name, seconds=round(seconds, 3), reply=reason)
        return self.until

    def opened(self) -> None:
        """The upstream took a message: usable again (the probe, if any, succeeded)."""
        if self.state != "ok":
            log.info("upstream.resumed", upstream=self.name, was=self.state)
        self.state, self.until, self.reason, self.probing, self.reauths = "ok", 0.0, "", False, 0

    def probe_ended(self) -> None:
        """The probe decided nothing (e.g. the connection was lost): another may probe."""
        if self.state != "ok" and self.until <= self.clock():
            self.probing = False

    def reset(self) -> None:
        """A reloaded config may carry the fixed password: try it at once."""
        if self.state == "reauth":
            self.until = 0.0
            self.probing = False

    def snapshot(self) -> dict[str, Any]:
        until = self.until if self.state != "ok" else None
        return {"state": self.state, "until": until, "reason": self.reason}
