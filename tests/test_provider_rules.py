"""Provider replies and pacing end to end: a real TLS upstream scripted to answer each reply."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from conftest import (
    Sink,
    eventually,
    make_config,
    message,
    queue_files,
    running,
    start_sink,
    stop_sink,
    submit,
)
from structlog.testing import capture_logs

from relayd.spool import Spool

PAUSE_RULE = "[{match: '^550 5\\.4\\.5', action: pause, for: 1.0}]"


def envelopes(cfg: Any, state: str = "queue") -> list[Any]:
    return list(Spool(Path(cfg.spool.path)).scan(state))


async def send(d: Any, n: int, rcpts: list[str] | None = None) -> None:
    for i in range(n):
        code, _ = await submit(
            d.address[1], "app@example.com", rcpts or ["u@example.org"], message(f"m{i}")
        )
        assert code == 250


async def test_daily_limit_pauses_the_upstream_and_fails_nothing(tmp_path, pki, sink):
    """550 5.4.5: nothing in failed/, no attempt counted, the upstream left alone for the
    pause (no new connection), then used again and every message delivered."""
    sink.data_replies = ["550 5.4.5 Daily user sending limit exceeded. For more information"]
    cfg = make_config(tmp_path, sink.port, pki.ca_file, upstream_replies=PAUSE_RULE)
    with capture_logs() as logs:
        async with running(cfg) as d:
            await send(d, 1)
            held = await eventually(
                lambda: [e for e in envelopes(cfg) if e.last_error], what="the held message"
            )
            refused_at = time.monotonic()
            assert held[0].attempts == 0 and held[0].last_error["action"] == "pause"
            assert d.relay.snapshot().upstream["state"] == "paused"
            await send(d, 2)  # new mail waits for the pause too
            await eventually(lambda: len(sink.messages) == 3, what="all three after the pause")
            await eventually(lambda: not queue_files(cfg), what="spool emptied")
    assert queue_files(cfg, "failed") == []
    later = [t for t in sink.connected_at if t > refused_at]
    assert later and min(later) >= refused_at + 0.8, (refused_at, sink.connected_at)
    assert [e["event"] for e in logs].count("upstream.paused") == 1
    assert any(e["event"] == "upstream.resumed" for e in logs)


async def test_throttling_failure_slows_down_but_delivers_everything(tmp_path, pki, sink):
    """SES 454 Throttling: the message is retried at once, the rate lowered, all delivered."""
    sink.data_replies = ["454 Throttling failure: Maximum sending rate exceeded."]
    cfg = make_config(tmp_path, sink.port, pki.ca_file, upstream_max_connections="1")
    with capture_logs() as logs:
        async with running(cfg) as d:
            await send(d, 3)
            await eventually(lambda: len(sink.messages) == 3, what="three deliveries")
            await eventually(lambda: not queue_files(cfg), what="spool emptied")
            state = d.relay.snapshot().upstream
    assert queue_files(cfg, "failed") == []
    assert state["state"] == "throttled" and state["throttled_until"]
    gaps = [b.at - a.at for a, b in zip(sink.messages, sink.messages[1:], strict=False)]
    assert min(gaps) >= 0.9, gaps  # the throttled pace: 1 s apart, not back to back
    held = [e for e in logs if e["event"] == "delivery.held"]
    assert [e["action"] for e in held] == ["throttle"]
    assert not any(e["event"] == "delivery.deferred" for e in logs)


async def test_sendgrid_451_authentication_failed_marks_reauth(tmp_path, pki, sink):
    """451 Authentication failed at AUTH: mail stays queued, the upstream is reauth, and a
    critical line says so."""
    sink.password = "another-key"
    sink.refused_auth_reply = "451 Authentication failed: Could not authenticate"
    cfg = make_config(tmp_path, sink.port, pki.ca_file)
    with capture_logs() as logs:
        async with running(cfg) as d:
            await send(d, 1)
            await eventually(lambda: d.relay.snapshot().upstream["reauth"], what="reauth")
            state = d.relay.snapshot().upstream
    assert state["state"] == "reauth" and "451" in state["reason"]
    assert len(envelopes(cfg)) == 1 and queue_files(cfg, "failed") == []
    alert = [e for e in logs if e["event"] == "upstream.reauth_needed"]
    assert alert and alert[0]["log_level"] == "critical"


async def test_plain_550_fails_only_that_recipient(tmp_path, pki, sink):
    """550 5.1.1 to one RCPT: that recipient fails, the other is delivered, no pause."""
    sink.rcpt_replies = {"gone@example.org": "550 5.1.1 no such user"}
    cfg = make_config(tmp_path, sink.port, pki.ca_file)
    async with running(cfg) as d:
        await send(d, 1, ["gone@example.org", "ok@example.org"])
        await eventually(lambda: queue_files(cfg, "failed"), what="the refusal in failed/")
        state = d.relay.snapshot().upstream["state"]
    assert sink.messages[0].rcpt_tos == ["ok@example.org"]
    (failed,) = envelopes(cfg, "failed")
    assert [(r.address, r.state) for r in failed.rcpt_to] == [
        ("gone@example.org", "failed"),
        ("ok@example.org", "delivered"),
    ]
    assert state == "ok"


async def test_a_paced_message_waits_for_its_slot_and_says_why(tmp_path, pki, sink):
    """rate 1/minute: the second message stays queued with no attempt, and `queue list`
    says it waits for the upstream's rate."""
    from test_cli_queue import run_cli

    cfg = make_config(tmp_path, sink.port, pki.ca_file, upstream_rate="1/minute")
    async with running(cfg) as d:
        await send(d, 2)
        await eventually(lambda: len(sink.messages) == 1, what="the first delivery")
        status = Path(cfg.spool.path) / "status.json"
        await eventually(
            lambda: (
                status.exists()
                and "rate" in json.loads(status.read_text())["upstream"].get("waiting", "")
            ),
            what="the waiting reason in status.json",
        )
        env = {"RELAYD_SPOOL_PATH": cfg.spool.path}
        code, out, _ = await run_cli(env, "queue", "list")
        code_json, out_json, _ = await run_cli(env, "queue", "list", "--json")
    assert code == code_json == 0 and "waiting for 127.0.0.1's rate, next slot in" in out
    (doc,) = json.loads(out_json)
    assert doc["attempts"] == 0 and doc["waiting"].startswith("waiting for 127.0.0.1's rate")
    assert len(sink.messages) == 1


async def test_health_json_and_metrics_show_the_pause(tmp_path, pki, sink):
    """Paused: `relayd health --json` gives the state and paused-until; the gauge is 1."""
    from prometheus_client import REGISTRY
    from test_cli_queue import run_cli

    sink.data_replies = ["550 5.4.5 Daily user sending limit exceeded."]
    rule = "[{match: '^550 5\\.4\\.5', action: pause, for: 300}]"
    cfg = make_config(tmp_path, sink.port, pki.ca_file, upstream_replies=rule)
    env = {"RELAYD_SPOOL_PATH": cfg.spool.path}

    async def paused() -> Any:
        code, out, _ = await run_cli(env, "health", "--json")
        doc = json.loads(out)
        ups = doc["upstreams"]
        return doc if code == 0 and ups and ups[0]["state"] == "paused" else None

    async with running(cfg) as d:
        await send(d, 1)
        doc = await eventually(paused, what="paused in health --json")
        await d._update_gauges()
    (up,) = doc["upstreams"]
    assert up["paused_until"] > time.time() + 250 and "5.4.5" in up["reason"]
    gauge = REGISTRY.get_sample_value("relayd_upstream_paused", {"upstream": "127.0.0.1"})
    assert gauge == 1.0


async def test_a_message_spooled_during_a_pacing_await_is_not_lost(tmp_path):
    """While the scheduler awaits the limiter for one message, an earlier-due one is spooled:
    both are sent (the scheduler once popped the wrong heap entry and lost the newcomer)."""
    import asyncio

    from relayd.outbox import Outbox
    from relayd.pacing import LocalLimiter
    from relayd.relay import Relay
    from relayd.spool import Spool

    cfg = make_config(tmp_path, 1, None, upstream_rate="100/second", upstream_burst="10")
    spool = Spool(Path(cfg.spool.path))
    spool.create()
    asked, answer = asyncio.Event(), asyncio.Event()

    class Answering(LocalLimiter):
        """Answers only when the test says so: a Redis round trip, made to last."""

        async def acquire(self, recipients: int = 1) -> Any:
            asked.set()
            await answer.wait()
            return self.take(recipients)

    relay = Relay(spool, cfg, lambda up: Outbox(spool))
    relay.provider.limiter = Answering(relay.provider.limiter.limits)  # type: ignore[attr-defined]
    now = time.time()
    late = spool.put("a@example.com", ["x@example.org"], message("late"), now)
    relay.enqueue(late)
    stop = asyncio.Event()
    run = asyncio.create_task(relay.run(stop, 5.0))
    await asyncio.wait_for(asked.wait(), 10)  # the scheduler is inside acquire() now
    early = spool.put("a@example.com", ["x@example.org"], message("early"), now - 10.0)
    relay.enqueue(early)
    answer.set()
    await eventually(lambda: not list(spool.scan()), what="both messages sent")
    stop.set()
    await run
    assert len(list((Path(cfg.spool.path) / "outbox").iterdir())) == 2


async def test_daily_limit_on_the_first_upstream_fails_over_to_the_second_at_once(tmp_path, pki):
    """550 5.4.5 from the first of two upstreams: nothing in failed/, no attempt counted, the
    second gets the mail at once; the first is paused (no connection to it during the pause),
    and once the pause is over it carries mail again."""
    from test_routes import entry, load

    first = await start_sink(Sink(), pki.server_ctx)
    second = await start_sink(Sink(), pki.server_ctx)
    first.data_replies = ["550 5.4.5 Daily user sending limit exceeded. For more information"]
    rule = {"match": r"^550 5\.4\.5", "action": "pause", "for": 2}
    ups = [entry("first", first, pki, replies=[rule]), entry("second", second, pki)]
    cfg = load(tmp_path, upstreams=ups)
    try:
        with capture_logs() as logs:
            async with running(cfg) as d:
                await send(d, 1)
                await eventually(lambda: second.messages, what="the mail via the second")
                paused_at = time.monotonic()
                states = {u["name"]: u for u in d.relay.snapshot().upstreams}
                assert states["first"]["state"] == "paused"
                assert states["first"]["paused_until"] > time.time() + 1
                await send(d, 2)  # during the pause: the second carries these as well
                await eventually(lambda: len(second.messages) == 3, what="two more via second")
                assert first.sessions == 1 and first.messages == []
                await eventually(
                    lambda: time.monotonic() > paused_at + 2.0, what="the pause to pass"
                )
                await send(d, 1)
                await eventually(lambda: first.messages, what="the first used again")
                await eventually(lambda: not queue_files(cfg), what="spool emptied")
    finally:
        await stop_sink(first)
        await stop_sink(second)
    assert queue_files(cfg, "failed") == [] and len(second.messages) == 3
    assert [t for t in first.connected_at if t < paused_at + 1.9] == first.connected_at[:1]
    sent = [e for e in logs if e["event"] == "delivery.sent"]
    assert [e["upstream"] for e in sent] == ["second", "second", "second", "first"]
    assert sent[0]["attempt"] == 1  # the pause counted no attempt
    assert not any(e["event"] in ("delivery.deferred", "delivery.held") for e in logs)
    assert [e["event"] for e in logs].count("upstream.paused") == 1
    assert not list(Spool(Path(cfg.spool.path)).scan("failed"))
