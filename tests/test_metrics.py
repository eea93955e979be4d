"""The /metrics, /healthz and /readyz endpoint, scraped over HTTP from a `relayd serve`."""

from __future__ import annotations

import asyncio
import signal
import urllib.error
import urllib.request

from conftest import (
    Sink,
    eventually,
    free_port,
    message,
    start_sink,
    stop_sink,
    submit,
    taken_port,
)
from proc import ServeProcess, serve_env
from prometheus_client.parser import text_string_to_metric_families


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} from one GET /metrics."""
    status, text = await asyncio.to_thread(_get, port, "/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def start(tmp_path, pki, upstream_port: int, **extra: str) -> tuple[ServeProcess, int]:
    env = serve_env(tmp_path / "spool", upstream_port, pki.ca_file, metrics_listen="127.0.0.1:0")
    env.update({f"RELAYD_{k.upper()}": v for k, v in extra.items()})
    proc = await ServeProcess(env).start()
    line = await eventually(lambda: proc.events("metrics.started"), what="metrics.started")
    port = int(line[0]["port"])
    assert port > 0 and line[0]["host"] == "127.0.0.1"
    return proc, port


async def test_counters_follow_accept_defer_flush_deliver(tmp_path, pki):
    """Accepted and deferred move while the upstream is down, the oldest age grows, and after
    SIGUSR1 with the upstream back, delivered moves and the queue gauge drops to 0."""
    upstream = free_port()
    proc, port = await start(
        tmp_path, pki, upstream, retry_initial_delay="30", retry_max_delay="60"
    )
    sink = None
    try:
        for i in range(2):
            code, _ = await submit(
                proc.port, "app@example.com", ["u@example.org"], message(f"m{i}")
            )
            assert code == 250
        m = await scrape(port)
        assert value(m, "relayd_messages_accepted_total") == 2

        async def deferred() -> bool:
            m = await scrape(port)
            return value(m, "relayd_messages_deferred_total") >= 2

        await eventually(deferred, what="2 deferrals")
        m = await scrape(port)
        assert value(m, "relayd_upstream_failures_total", step="connect") >= 1
        assert value(m, "relayd_queue_depth", state="queue") == 2
        first_age = value(m, "relayd_queue_oldest_age_seconds")
        assert first_age > 0

        async def older() -> bool:
            m = await scrape(port)
            return value(m, "relayd_queue_oldest_age_seconds") > first_age

        await eventually(older, what="oldest age to grow")
        sink = await start_sink(Sink(), pki.server_ctx, port=upstream)
        proc.signal(signal.SIGUSR1)  # retry delay is 30 s: only the flush sends them now

        async def delivered() -> bool:
            m = await scrape(port)
            # delivered counts at the upstream's 250; the message leaves the queue just after
            done = value(m, "relayd_queue_depth", state="queue") == 0
            return value(m, "relayd_messages_delivered_total") == 2 and done

        await eventually(delivered, what="2 deliveries")
        m = await scrape(port)
        assert len(sink.messages) == 2
        assert value(m, "relayd_queue_depth", state="queue") == 0
        assert value(m, "relayd_queue_oldest_age_seconds") == 0
        assert value(m, "relayd_delivery_duration_seconds_count") >= 1
        await eventually(lambda: proc.events("queue.flushed"), what="queue.flushed")
    finally:
        assert await proc.stop() == 0
        if sink is not None:
            await stop_sink(sink)


async def test_permanent_refusal_counts_by_reply_class_and_failed_depth(tmp_path, pki, sink):
    """A 550 from the upstream counts as failed{reply_class="5xx"} and in failed/ depth."""
    sink.rcpt_replies["bad@example.org"] = "550 5.1.1 no such user"
    proc, port = await start(tmp_path, pki, sink.port)
    try:
        code, _ = await submit(proc.port, "app@example.com", ["bad@example.org"], message("x"))
        assert code == 250

        async def failed() -> bool:
            # Delivery counters come from the delivery process in periodic reports, so the
            # counter and the failed/ depth (read at scrape time) agree eventually, not at once.
            m = await scrape(port)
            return (
                value(m, "relayd_queue_depth", state="failed") == 1
                and value(m, "relayd_messages_failed_total", reply_class="5xx") == 1
            )

        await eventually(failed, what="failed depth 1 and failed{5xx} 1")
        m = await scrape(port)
        assert value(m, "relayd_messages_delivered_total") == 0
    finally:
        assert await proc.stop() == 0


async def test_healthz_readyz_and_unknown_paths(tmp_path, pki):
    """/healthz answers 200 while the loop runs, /readyz once serving; others are 404."""
    proc, port = await start(tmp_path, pki, free_port())
    try:
        assert await asyncio.to_thread(_get, port, "/healthz") == (200, "ok\n")

        async def ready() -> bool:  # the endpoint starts just before READY
            return await asyncio.to_thread(_get, port, "/readyz") == (200, "ready\n")

        await eventually(ready, what="/readyz 200")
        status, _ = await asyncio.to_thread(_get, port, "/nope")
        assert status == 404
    finally:
        assert await proc.stop() == 0


async def test_metrics_port_taken_is_one_line_not_a_traceback(tmp_path, pki):
    """A metrics.listen port already in use stops start-up with one line naming the key."""
    with taken_port() as taken:
        env = serve_env(
            tmp_path / "spool", free_port(), pki.ca_file, metrics_listen=f"127.0.0.1:{taken}"
        )
        proc = ServeProcess(env)
        code = await proc.expect_exit()
    assert code == 1
    text = "\n".join(proc.raw)
    assert "metrics.listen: cannot listen on" in text
    assert "Traceback" not in text
