"""Several upstreams: failover within one attempt, the circuit breaker, routes, From policy.

Every upstream is a real TLS server on 127.0.0.1 (aiosmtpd Sinks, or the FaultServer for
faults); daemons are real `relayd serve` subprocesses where `relayd health --json` is read.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import (
    PASSWORD,
    USER,
    Pki,
    Sink,
    eventually,
    free_port,
    message,
    start_sink,
    stop_sink,
    submit,
)
from faults import FaultServer
from proc import ServeProcess

FAST_RETRY = {"initial_delay": 0.05, "max_delay": 0.3}


def upstream(name: str, port: int, pki: Pki, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "host": "127.0.0.1",
        "port": port,
        "ca_file": str(pki.ca_file),
        "username": USER,
        "password": PASSWORD,
        "timeout": 5,
        **extra,
    }


def write_config(tmp_path: Path, ups: list[dict[str, Any]], **sections: Any) -> Path:
    doc = {"upstreams": ups, "retry": FAST_RETRY, **sections}
    path = tmp_path / "relayd.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


async def serve(tmp_path: Path, path: Path) -> ServeProcess:
    env = {
        "RELAYD_LISTEN_PORT": "0",
        "RELAYD_SPOOL_PATH": str(tmp_path / "spool"),
        "RELAYD_LOG_LEVEL": "debug",
    }
    return await ServeProcess(env, ["--config", str(path)]).start()


async def health_json(tmp_path: Path) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relayd",
        "health",
        "--json",
        env={**os.environ, "RELAYD_SPOOL_PATH": str(tmp_path / "spool")},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    doc: dict[str, Any] = json.loads(out)
    return doc


def states(doc: dict[str, Any]) -> dict[str, str]:
    return {u["name"]: u["state"] for u in (doc.get("status") or {}).get("upstreams", [])}


async def first_open(tmp_path: Path, state: str = "open") -> dict[str, Any] | None:
    """The health --json document once the first upstream waits: open, or reauth after a
    refused login (535 is a reauth reply: open until a reload or a successful probe)."""
    doc = await health_json(tmp_path)
    return doc if states(doc).get("first") == state else None


def sent_events(proc: ServeProcess) -> list[dict[str, Any]]:
    return proc.events("delivery.sent")


@pytest.fixture
async def second(pki: Pki) -> Any:
    s = await start_sink(Sink(), pki.server_ctx)
    yield s
    await stop_sink(s)


async def _fails_over(
    tmp_path: Path, pki: Pki, second: Sink, first_port: int, state: str = "open"
) -> ServeProcess:
    path = write_config(
        tmp_path,
        [
            upstream("first", first_port, pki, failure_threshold=1, cooldown=60),
            upstream("second", second.port, pki),
        ],
    )
    proc = await serve(tmp_path, path)
    code, _ = await submit(proc.port, "app@example.com", ["u@example.org"], message("fo"))
    assert code == 250
    await eventually(lambda: second.messages, what="delivery through the second upstream")
    await eventually(lambda: sent_events(proc), what="delivery.sent")
    sent = sent_events(proc)[0]
    assert sent["attempt"] == 1 and sent["upstream"] == "second"
    assert proc.events("delivery.deferred") == []
    doc = await eventually(lambda: first_open(tmp_path, state), what=f"first {state} in health")
    assert doc["healthy"] is True and f"upstream first {state}" in doc["line"]
    assert states(doc)["second"] == "ok"
    return proc


async def test_refused_tcp_fails_over_within_one_attempt(tmp_path, pki, second):
    """The first upstream refuses TCP: the message goes out through the second, attempt 1."""
    proc = await _fails_over(tmp_path, pki, second, free_port())
    assert await proc.stop() == 0


async def test_failed_tls_verification_fails_over_within_one_attempt(tmp_path, pki, second):
    """The first upstream's certificate is from an unknown CA: the second carries the mail."""
    async with FaultServer(pki) as first:
        first.fail("cert_unknown_ca")
        proc = await _fails_over(tmp_path, pki, second, first.port)
        assert await proc.stop() == 0
        assert first.messages == []


async def test_auth_535_fails_over_within_one_attempt(tmp_path, pki, second):
    """The first upstream answers 535 to AUTH: the second carries the mail, no deferral."""
    async with FaultServer(pki) as first:
        first.fail("auth_535")
        proc = await _fails_over(tmp_path, pki, second, first.port, "reauth")
        assert await proc.stop() == 0
        assert first.messages == []
        assert any(e.get("upstream") == "first" for e in proc.events("upstream.auth_failed"))


async def test_open_upstream_is_probed_and_used_again_after_its_cooldown(tmp_path, pki, second):
    """First fails once (open); after the cooldown one probe succeeds and it carries mail."""
    async with FaultServer(pki) as first:
        first.fail("auth_535", times=1)
        path = write_config(
            tmp_path,
            [
                upstream("first", first.port, pki, failure_threshold=1, cooldown=0.5),
                upstream("second", second.port, pki),
            ],
        )
        proc = await serve(tmp_path, path)
        try:
            await submit(proc.port, "app@example.com", ["u@example.org"], message("a"))
            await eventually(lambda: second.messages, what="first message via second")
            await eventually(
                lambda: any(c["state"] == "reauth" for c in proc.events("upstream.state_changed")),
                what="first in reauth (535)",
            )
            cooled = time.time() + 0.5  # the breaker opened before we saw its log line
            await eventually(lambda: time.time() > cooled, what="the cooldown to pass")
            await submit(proc.port, "app@example.com", ["u@example.org"], message("b"))
            await eventually(lambda: first.messages, what="second message via the first again")
            assert b"Subject: b" in first.messages[0].data and len(second.messages) == 1
            changes = [(c["upstream"], c["state"]) for c in proc.events("upstream.state_changed")]
            assert changes == [("first", "reauth"), ("first", "half_open"), ("first", "ok")]
            doc = await eventually(
                lambda: _first_ok(tmp_path), what="first ok again in health --json"
            )
            assert "upstream first" not in doc["line"]
        finally:
            assert await proc.stop() == 0


async def _first_ok(tmp_path: Path) -> dict[str, Any] | None:
    doc = await health_json(tmp_path)
    return doc if states(doc).get("first") == "ok" else None


async def test_readyz_upstreams_fails_while_a_route_has_no_usable_upstream(tmp_path, pki, second):
    """/readyz?upstreams 503 once the only upstream of a route is open, while plain /readyz
    stays 200 (apps may still hand mail over); relayd_upstream_state shows the state."""
    from test_metrics import _get, scrape, value

    path = write_config(
        tmp_path,
        [
            upstream("first", free_port(), pki, failure_threshold=1, cooldown=60),
            upstream("second", second.port, pki),
        ],
        routes=[
            {"name": "alerts", "match": {"sender": "*@alerts.example.com"}, "via": ["first"]},
            {"name": "rest", "via": ["first", "second"]},
        ],
        metrics={"listen": "127.0.0.1:0"},
    )
    proc = await serve(tmp_path, path)
    try:
        port = int((await eventually(lambda: proc.events("metrics.started")))[0]["port"])

        async def ready() -> bool:  # ready once serving (metrics start a moment earlier)
            return await asyncio.to_thread(_get, port, "/readyz?upstreams") == (200, "ready\n")

        await eventually(ready, what="/readyz 200 while every route has a usable upstream")
        await submit(proc.port, "app@example.com", ["u@example.org"], message("r"))
        await eventually(lambda: second.messages, what="delivered through second")

        async def not_ready() -> bool:
            got = await asyncio.to_thread(_get, port, "/readyz?upstreams")
            return got == (503, "not ready: no usable upstream for route alerts\n")

        await eventually(not_ready, what="/readyz?upstreams 503: route alerts has none")
        assert await asyncio.to_thread(_get, port, "/readyz") == (200, "ready\n")
        samples = await scrape(port)
        assert value(samples, "relayd_upstream_state", upstream="first", state="open") == 1.0
        assert value(samples, "relayd_upstream_state", upstream="first", state="ok") == 0.0
        assert value(samples, "relayd_upstream_state", upstream="second", state="ok") == 1.0
        assert len(proc.events("upstream.state_changed")) == 1  # one line for the change
    finally:
        assert await proc.stop() == 0


async def test_queue_show_names_the_upstream_of_each_try_and_those_failed_over(
    tmp_path, pki, second
):
    """A deferral after failover: queue show/list name both upstreams and the failures."""
    second.data_replies = ["451 4.3.0 try later"]
    path = write_config(
        tmp_path,
        [upstream("first", free_port(), pki), upstream("second", second.port, pki)],
        retry={"initial_delay": 60, "max_delay": 120},
    )
    proc = await serve(tmp_path, path)
    try:
        await submit(proc.port, "app@example.com", ["u@example.org"], message("q"))
        await eventually(lambda: proc.events("delivery.deferred"), what="deferred by second")
        env = {**proc.env, "RELAYD_CONFIG": str(path)}
        code, out = await cli(env, "queue", "show", "--json", ".")
        assert code == 0, out
        doc = json.loads(out)
        entry = doc["history"][-1]
        assert doc["upstream"] == "second" and entry["upstream"] == "second"
        assert entry["code"] == 451
        assert [f["upstream"] for f in entry["failover"]] == ["first"]
        assert entry["failover"][0]["step"] == "connect"
        code, text = await cli(env, "queue", "show", doc["id"])
        assert "via second" in text and "after first failed at connect" in text
        code, listing = await cli(env, "queue", "list")
        assert "VIA" in listing.splitlines()[0] and " second " in listing
    finally:
        assert await proc.stop() == 0


async def cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relayd",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_check_walks_every_upstream_in_one_block_each_or_only_the_named_one(
    tmp_path, pki, second
):
    """relayd check: a block per upstream, exit 1 when one fails; `check NAME` only that one."""
    path = write_config(
        tmp_path, [upstream("first", free_port(), pki), upstream("second", second.port, pki)]
    )
    env = {**os.environ, "RELAYD_CONFIG": str(path), "RELAYD_SPOOL_PATH": str(tmp_path / "s")}
    code, out = await cli(env, "check")
    assert code == 1
    first_block, second_block = out.split("\n\n")
    assert first_block.startswith("checking first: 127.0.0.1:") and "failed at connect" in out
    assert second_block.startswith("checking second: ") and "ok: the upstream is reachable" in out
    code, out = await cli(env, "check", "second")
    assert code == 0 and "checking first" not in out and second.logins == [USER, USER]
    code, out = await cli(env, "check", "third")
    assert code == 2 and "no upstream is called 'third' (configured: first, second)" in out


async def test_refused_then_untrusted_then_535_each_fail_over_and_the_third_opens_it(
    tmp_path, pki, second
):
    """Default threshold 3: TCP refused, TLS unverifiable, AUTH 535 in turn; each message goes
    out through the second upstream in its first attempt, and after the third the first waits
    (in reauth: a 535 is a refused login, which waits for a reload or a successful probe)."""
    port = free_port()
    path = write_config(
        tmp_path,
        [upstream("first", port, pki, cooldown=60), upstream("second", second.port, pki)],
    )
    proc = await serve(tmp_path, path)
    first = FaultServer(pki)
    try:
        for i, fault in enumerate(["refused", "cert_unknown_ca", "auth_535"], 1):
            if fault == "cert_unknown_ca":
                await first.start(port)
            if fault != "refused":
                first.faults = {fault: None}
            await submit(proc.port, "app@example.com", ["u@example.org"], message(f"f{i}"))
            await eventually(lambda i=i: len(second.messages) == i, what=f"message {i} via second")
            await eventually(lambda i=i: len(sent_events(proc)) == i, what="delivery.sent")
            assert sent_events(proc)[-1]["attempt"] == 1
        assert proc.events("delivery.deferred") == [] and first.messages == []
        assert [c["state"] for c in proc.events("upstream.state_changed")] == ["reauth"]
        await eventually(lambda: first_open(tmp_path, "reauth"), what="first reauth in health")
    finally:
        assert await proc.stop() == 0
        await first.stop()


def upstreams_by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {u["name"]: u for u in (doc.get("status") or {}).get("upstreams", [])}


async def _both_listed(tmp_path: Path) -> dict[str, dict[str, Any]] | None:
    ups = upstreams_by_name(await health_json(tmp_path))
    return ups if {"office", "quiet"} <= set(ups) else None


async def test_a_presets_limits_are_in_force_and_an_explicit_key_overrides_them(
    tmp_path, pki, second
):
    """`relayd health --json` shows m365's published 30/minute and 10,000 recipients a day for
    an upstream with only the preset; `rate: none` on another m365 upstream has no rate."""
    path = write_config(
        tmp_path,
        [
            upstream("office", second.port, pki, preset="m365", tls="implicit"),
            upstream("quiet", second.port, pki, preset="m365", tls="implicit", rate="none"),
        ],
    )
    proc = await serve(tmp_path, path)
    try:
        ups = await eventually(lambda: _both_listed(tmp_path), what="both upstreams in health")
    finally:
        assert await proc.stop() == 0
    office, quiet = ups["office"], ups["quiet"]
    assert office["rate"] == "30/minute, 10000 recipients/day" and office["daily"] == 10000
    assert office["rate_per_second"] == pytest.approx(0.5)
    assert quiet["rate"] == "no rate, 10000 recipients/day" and quiet["rate_per_second"] is None
