"""The per-upstream circuit breaker, routes and From rewriting: pure logic, a mocked clock."""

from __future__ import annotations

from structlog.testing import capture_logs

from relayd import rewrite, routes
from relayd.breaker import Breaker, UpstreamState


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_connection_failures_and_not_for_message_replies():
    """Three connect failures open it; a failed RCPT never counts."""
    clock = Clock()
    b = Breaker("up", failure_threshold=3, cooldown=10, max_cooldown=100, clock=clock)
    b.record_failure("rcpt: 550 no such user", "rcpt")
    b.record_failure("connect: refused")
    b.record_failure("connect: refused")
    assert b.state == UpstreamState.OK and b.usable()
    b.record_failure("connect: refused")
    assert b.state == UpstreamState.OPEN and not b.usable()
    assert b.next_probe_at == 1010.0


def test_after_the_cooldown_exactly_one_probe_is_admitted():
    """Half-open lets one session start; the others wait until it decides."""
    clock = Clock()
    b = Breaker("up", failure_threshold=1, cooldown=10, clock=clock)
    b.record_failure("tls: verify failed", "tls")
    assert not b.admit()
    clock.now += 10
    assert b.admit() and b.state == UpstreamState.HALF_OPEN
    assert not b.admit() and not b.usable()
    b.record_success()
    assert b.state == UpstreamState.OK and b.admit()


def test_a_failed_probe_reopens_with_a_doubled_cooldown_capped():
    """Each failed probe doubles the rest, up to max_cooldown; success resets it."""
    clock = Clock()
    b = Breaker("up", failure_threshold=1, cooldown=10, max_cooldown=25, clock=clock)
    b.record_failure("connect: refused")
    waits = []
    for _ in range(3):
        clock.now = b.next_probe_at or clock.now
        assert b.admit()
        b.record_failure("connect: refused")
        waits.append((b.next_probe_at or 0) - clock.now)
    assert waits == [20.0, 25.0, 25.0]


def test_each_change_is_one_log_line():
    """Open, half_open, ok: three lines for one outage, not one per failed message."""
    clock = Clock()
    b = Breaker("up", failure_threshold=1, cooldown=5, clock=clock)
    with capture_logs() as logs:
        b.record_failure("connect: refused")
        b.record_failure("connect: refused")  # a straggler while open: no new line
        clock.now += 5
        b.admit()
        b.record_success()
        b.record_success()
    assert [(e["event"], e["state"]) for e in logs] == [
        ("upstream.state_changed", "open"),
        ("upstream.state_changed", "half_open"),
        ("upstream.state_changed", "ok"),
    ]


def test_reauth_waits_for_a_reload_and_pause_for_its_deadline():
    """reauth is cleared by reset() (SIGHUP); pause(until) by the clock."""
    clock = Clock()
    b = Breaker("up", cooldown=60, clock=clock)
    b.reauth("535 bad credentials")
    assert b.state == UpstreamState.REAUTH and not b.usable()
    b.reset()
    assert b.state == UpstreamState.OK
    b.pause(clock.now + 30, "daily limit")
    assert not b.usable()
    clock.now += 30
    assert b.usable() and b.admit() and b.state == UpstreamState.HALF_OPEN


def test_first_matching_route_wins_and_header_from_is_matched_after_data():
    """Sender globs, then header From globs; an unknown header From defers the answer."""
    table = routes.Table(
        (
            routes.Route("news", header_from=("*@news.example.com",), via=("bulk",)),
            routes.Route("billing", senders=("*@billing.example.com",), via=("sg",)),
            routes.Route("rest", via=("gw",)),
        ),
        {"bulk": (), "sg": (), "gw": ("*@example.com",)},
    )
    assert table.decide("a@billing.example.com", None).via == ("sg",)
    assert table.decide("a@billing.example.com", "x@news.example.com").via == ("bulk",)
    assert table.decide("ME@Example.COM", "me@example.com").route == "rest"
    assert table.refusal_at_mail("x@elsewhere.org") == ""  # the news route may still match
    assert "allowed_from" in table.decide("x@elsewhere.org", "x@elsewhere.org").refusal


def test_rewrite_keeps_the_display_name_and_moves_the_original_to_reply_to():
    """From becomes the account with the same display name; Reply-To gets the original."""
    msg = b'Subject: s\r\nFrom: "Shop, Billing" <b@shop.example>\r\n\r\nFrom: body line\r\n'
    out, original = rewrite.rewrite_from(msg, "acct@gmail.com")
    assert original == '"Shop, Billing" <b@shop.example>'
    assert b'From: "Shop, Billing" <acct@gmail.com>\r\n' in out
    assert b'Reply-To: "Shop, Billing" <b@shop.example>\r\n' in out
    assert out.endswith(b"\r\n\r\nFrom: body line\r\n")
    kept, _ = rewrite.rewrite_from(b"From: a@b\r\nReply-To: r@b\r\n\r\nx", "acct@gmail.com")
    assert kept == b"From: acct@gmail.com\r\nReply-To: r@b\r\n\r\nx"


def test_a_reload_that_changes_an_upstreams_login_clears_its_reauth():
    """reauth waits for a config change: same credentials keep it, new ones reset it."""
    import dataclasses

    from relayd import config as config_mod
    from relayd.pool import Pool

    env = {"RELAYD_UPSTREAM_HOST": "smtp.example.com", "RELAYD_UPSTREAM_USERNAME": "u@x"}
    cfg = config_mod.load(None, {**env, "RELAYD_UPSTREAM_PASSWORD": "old-pass-1"})
    pool = Pool(cfg, Clock())
    breaker = pool.upstreams["default"].breaker
    breaker.reauth("535 bad credentials")
    pool.reconfigure(dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, level="debug")))
    assert breaker.state == UpstreamState.REAUTH
    pool.reconfigure(config_mod.load(None, {**env, "RELAYD_UPSTREAM_PASSWORD": "new-pass-2"}))
    assert pool.upstreams["default"].breaker is breaker and breaker.state == UpstreamState.OK
