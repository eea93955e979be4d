"""The upstream gate: pause, one probe after it, reopen on success; on a fake clock."""

from __future__ import annotations

from structlog.testing import capture_logs

from relayd.gate import PROBE_WAIT, Gate


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_pause_blocks_until_its_end() -> None:
    """Paused for 60 s: wait() says how long is left."""
    clock = Clock()
    gate = Gate("smtp.example.com", clock)
    gate.close("paused", 60.0, "550 5.4.5 Daily user sending limit exceeded")
    clock.now += 20.0
    assert gate.closed_for() == 40.0 and not gate.claim()


def test_after_a_pause_one_message_probes_and_the_rest_wait() -> None:
    """At the pause's end the first caller may go; the next waits until the probe reports."""
    clock = Clock()
    gate = Gate("smtp.example.com", clock)
    gate.close("paused", 60.0, "550 5.4.5")
    clock.now += 60.0
    assert gate.closed_for() == 0.0 and gate.claim()
    assert gate.closed_for() == PROBE_WAIT and not gate.claim()
    gate.opened()
    assert gate.closed_for() == 0.0 and gate.claim() and gate.state == "ok"


def test_a_probe_that_decided_nothing_lets_another_probe() -> None:
    """The probe's connection was lost: probe_ended() frees the next message to probe."""
    clock = Clock()
    gate = Gate("smtp.example.com", clock)
    gate.close("paused", 1.0, "550 5.4.5")
    clock.now += 1.0
    assert gate.claim() and not gate.claim()
    gate.probe_ended()
    assert gate.claim()


def test_each_change_is_logged_once_and_reauth_is_critical() -> None:
    """Two pauses in a row log one upstream.paused; a reauth logs at critical."""
    gate = Gate("smtp.example.com", Clock())
    with capture_logs() as logs:
        gate.close("paused", 60.0, "550 5.4.5")
        gate.close("paused", 60.0, "550 5.4.5")
        gate.close("reauth", 10.0, "535 5.7.8")
        gate.opened()
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("upstream.paused", "warning"),
        ("upstream.reauth_needed", "critical"),
        ("upstream.resumed", "info"),
    ]


def test_a_reload_lets_a_reauth_gate_probe_at_once() -> None:
    """reset() after a config change ends the reauth wait (a pause is kept)."""
    gate = Gate("smtp.example.com", Clock())
    gate.close("reauth", 300.0, "535 5.7.8")
    gate.reset()
    assert gate.closed_for() == 0.0
    gate.close("paused", 300.0, "550 5.4.5")
    gate.reset()
    assert gate.closed_for() == 300.0
