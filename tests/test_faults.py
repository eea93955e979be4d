"""A hostile upstream: every transient fault ends in delivery, every permanent one in failed/,
no hang outlives upstream.timeout by much, and TLS trouble never means plaintext."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import eventually, make_config, message, queue_files, running, submit
from faults import FaultServer
from structlog.testing import capture_logs

TIMEOUT = 1.0  # upstream.timeout for these tests: a hang must cost about this, not 30 s


@pytest.fixture
async def faults(pki) -> AsyncIterator[FaultServer]:
    async with FaultServer(pki) as fs:
        yield fs


def fault_config(tmp_path: Path, fs: FaultServer, **env: str):
    return make_config(tmp_path, fs.port, None, upstream_timeout=str(TIMEOUT), **env)


@pytest.fixture
def cfg(tmp_path, pki, faults):
    return make_config(tmp_path, faults.port, pki.ca_file, upstream_timeout=str(TIMEOUT))


def last_json(cfg, state: str = "queue") -> dict | None:
    files = sorted((Path(cfg.spool.path) / state).glob("*.json"))
    return json.loads(files[0].read_text()) if files else None


TRANSIENT = [
    ("close_on_connect", "tls"),
    ("reset_in_handshake", "tls"),
    ("cert_wrong_host", "tls"),
    ("cert_unknown_ca", "tls"),
    ("banner_421", "connect"),
    ("ehlo_421", "ehlo"),
    ("auth_535", "auth"),
    ("banner_hang", "connect"),
    ("data_451", "data"),
    ("data_hang", "data"),
    ("data_drop", "data"),
]


@pytest.mark.parametrize(("fault", "step"), TRANSIENT, ids=[f for f, _ in TRANSIENT])
async def test_transient_fault_ends_in_one_delivery(cfg, faults, fault, step):
    """Two sessions (or DATAs) hit the fault, the third attempt delivers exactly once."""
    faults.fail(fault, times=2)
    started = time.monotonic()
    with capture_logs() as logs:
        async with running(cfg) as d:
            code, _ = await submit(d.address[1], "app@example.com", ["u@example.org"], message())
            assert code == 250
            await eventually(lambda: faults.messages, timeout=20, what=f"delivery after {fault}")
            await eventually(lambda: not queue_files(cfg), what="spool emptied")
    elapsed = time.monotonic() - started
    assert faults.fired[fault] == 2
    assert len(faults.messages) == 1 and faults.messages[0].data == message()
    deferred = [e for e in logs if e["event"] == "delivery.deferred"]
    assert [e["step"] for e in deferred] == [step, step], deferred
    sent = [e for e in logs if e["event"] == "delivery.sent"]
    assert sent[0]["attempt"] == 3
    # Two hangs at most, each bounded by the timeout: generous, but nowhere near 2 x 30 s.
    assert elapsed < 10 * TIMEOUT, elapsed
    assert faults.plaintext == []


async def test_slow_replies_within_the_timeout_still_deliver_first_time(cfg, faults):
    """Each reply 0.2 s late but inside upstream.timeout: one attempt, delivered."""
    faults.slow_delay = 0.2
    faults.fail("slow", times=1)
    async with running(cfg) as d:
        await submit(d.address[1], "app@example.com", ["u@example.org"], message())
        await eventually(lambda: faults.messages, timeout=20, what="slow delivery")
    assert faults.fired["slow"] == 1 and faults.sessions == 1


async def test_replies_slower_than_the_timeout_are_abandoned_then_retried(cfg, faults):
    """Replies 3 s late with timeout 1 s: the attempt gives up in ~1 s; the next delivers."""
    faults.slow_delay = 3.0
    faults.fail("slow", times=1)
    started = time.monotonic()
    with capture_logs() as logs:
        async with running(cfg) as d:
            await submit(d.address[1], "app@example.com", ["u@example.org"], message())
            await eventually(lambda: faults.messages, timeout=20, what="delivery after slowness")
    assert time.monotonic() - started < 3.0 + 5 * TIMEOUT
    assert [e["event"] for e in logs if e["event"].startswith("delivery.")] == [
        "delivery.deferred",
        "delivery.sent",
    ]


async def test_552_after_data_fails_with_the_reply(cfg, faults):
    """552 to the final dot is permanent: failed/ keeps the message and the reply."""
    faults.fail("data_552")
    async with running(cfg) as d:
        await submit(d.address[1], "app@example.com", ["u@example.org"], message())
        await eventually(lambda: len(queue_files(cfg, "failed")) == 2, what="failed/ pair")
    env = last_json(cfg, "failed")
    assert env["rcpt_to"][0]["code"] == 552
    assert "too big" in env["reason"] and env["attempts"] == 1
    assert faults.messages == [] and queue_files(cfg) == []


async def test_550_for_one_recipient_fails_only_that_one(cfg, faults):
    """A 550 RCPT is recorded in failed/; the other recipient is delivered once."""
    faults.rcpt_replies = {"gone@example.org": "550 5.1.1 fault: no such user"}
    async with running(cfg) as d:
        await submit(
            d.address[1], "app@example.com", ["gone@example.org", "ok@example.org"], message()
        )
        await eventually(lambda: len(queue_files(cfg, "failed")) == 2, what="failed/ pair")
    assert [m.rcpt_tos for m in faults.messages] == [["ok@example.org"]]
    env = last_json(cfg, "failed")
    assert "gone@example.org: 550 5.1.1 fault: no such user" in env["reason"]


@pytest.mark.parametrize(
    "fault", ["cert_wrong_host", "cert_unknown_ca", "reset_in_handshake", "close_on_connect"]
)
async def test_tls_fault_never_falls_back_to_plaintext(cfg, faults, fault):
    """A TLS fault that never clears: retries, nothing in plaintext, no SMTP command seen."""
    faults.fail(fault)
    async with running(cfg) as d:
        await submit(d.address[1], "app@example.com", ["u@example.org"], message())
        await eventually(lambda: faults.sessions >= 3, timeout=20, what="three attempts")
    env = last_json(cfg)
    assert env is not None and env["last_error"]["step"] == "tls"
    assert faults.plaintext == []
    assert faults.commands == []
    assert faults.messages == []
