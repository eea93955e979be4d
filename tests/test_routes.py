"""Routes by sender, refusal at MAIL, From rewriting, and the m365 preset: against real TLS sinks.

The daemon runs in-process (one event loop, relay.separate_process false) so its log lines can
be captured; the upstreams are aiosmtpd sinks behind a trustme CA on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiosmtplib
import yaml
from conftest import (
    PASSWORD,
    PASSWORD2,
    USER,
    USER2,
    Pki,
    Sink,
    eventually,
    running,
    start_sink,
    stop_sink,
    submit,
)
from structlog.testing import capture_logs

from relayd import config as config_mod


def entry(name: str, sink: Sink, pki: Pki, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "host": "127.0.0.1",
        "port": sink.port,
        "ca_file": str(pki.ca_file),
        "username": USER,
        "password": PASSWORD,
        "timeout": 5,
        **extra,
    }


def load(tmp_path: Path, **doc: Any) -> config_mod.Config:
    doc = {
        "listen": {"port": 0},
        "spool": {"path": str(tmp_path / "spool")},
        "retry": {"initial_delay": 0.05, "max_delay": 0.3},
        "relay": {"separate_process": False},
        **doc,
    }
    path = tmp_path / "relayd.yaml"
    path.write_text(yaml.safe_dump(doc))
    return config_mod.load(path, {})


def body(sender: str, subject: str, extra: str = "") -> bytes:
    return (
        f"{extra}From: Billing Team <{sender}>\r\nTo: u@example.org\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@example.com>\r\n\r\nHello.\r\n"
    ).encode()


async def two_sinks(pki: Pki) -> tuple[Sink, Sink]:
    main = await start_sink(Sink(), pki.server_ctx)
    billing = await start_sink(Sink(user=USER2, password=PASSWORD2), pki.server_ctx)
    return main, billing


async def test_senders_are_routed_by_glob_each_with_its_own_login(tmp_path, pki):
    """billing@ mail goes to the billing upstream with its login, the rest to main with its."""
    main, billing = await two_sinks(pki)
    cfg = load(
        tmp_path,
        upstreams=[
            entry("main", main, pki),
            entry("billing", billing, pki, username=USER2, password=PASSWORD2),
        ],
        routes=[
            {"name": "billing", "match": {"sender": "*@billing.example.com"}, "via": ["billing"]},
            {"name": "rest", "via": ["main"]},
        ],
    )
    try:
        async with running(cfg) as d:
            port = d.address[1]
            for i in range(3):
                sender = "invoices@billing.example.com"
                assert (await submit(port, sender, ["u@example.org"], body(sender, f"b{i}")))[
                    0
                ] == 250
                assert (await submit(port, USER, ["u@example.org"], body(USER, f"m{i}")))[0] == 250
            await eventually(lambda: len(main.messages) == 3 and len(billing.messages) == 3)
        assert {m.mail_from for m in billing.messages} == {"invoices@billing.example.com"}
        assert {m.mail_from for m in main.messages} == {USER}
        assert set(billing.logins) == {USER2} and set(main.logins) == {USER}
        assert main.auth_failures == billing.auth_failures == 0
    finally:
        await stop_sink(main)
        await stop_sink(billing)


async def mail_replies(port: int, *senders: str) -> list[tuple[int, str]]:
    """The replies to MAIL FROM for each sender, in one session (RSET between them)."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10)
    await client.connect()
    replies = []
    try:
        await client.ehlo()
        for sender in senders:
            reply = await client.execute_command(b"MAIL", f"FROM:<{sender}>".encode())
            replies.append((reply.code, reply.message))
            await client.rset()
    finally:
        client.close()
    return replies


async def test_a_sender_no_route_accepts_is_refused_at_mail(tmp_path, pki, sink):
    """No route matches: 550 at MAIL naming the reason; the session goes on for others."""
    cfg = load(
        tmp_path,
        upstreams=[entry("main", sink, pki)],
        routes=[{"match": {"sender": ["*@example.com", "*@*.example.com"]}, "via": ["main"]}],
    )
    async with running(cfg) as d:
        (code, text), ok = await mail_replies(d.address[1], "x@elsewhere.org", "a@b.example.com")
    assert code == 550 and "no route matches" in text
    assert ok[0] == 250
    assert list((tmp_path / "spool" / "queue").iterdir()) == []


async def test_allowed_from_refuses_at_mail_what_the_upstream_would_reject(tmp_path, pki, sink):
    """allowed_from on the only upstream of the route: other senders get 550 at MAIL."""
    cfg = load(tmp_path, upstreams=[entry("main", sink, pki, allowed_from=["*@example.com"])])
    async with running(cfg) as d:
        (code, text), ok = await mail_replies(d.address[1], "x@other.org", USER)
        assert code == 550 and "allowed_from" in text
        assert ok[0] == 250


async def test_rewrite_sends_as_the_account_and_keeps_the_sender_for_replies(tmp_path, pki, sink):
    """from_policy rewrite: envelope and From are the account, Reply-To the original From."""
    cfg = load(tmp_path, upstreams=[entry("gw", sink, pki, from_policy="rewrite")])
    sender = "billing@shop.example"
    with capture_logs() as logs:
        async with running(cfg) as d:
            code, _ = await submit(d.address[1], sender, ["u@example.org"], body(sender, "rw"))
            assert code == 250
            await eventually(lambda: sink.messages)
    got = sink.messages[0]
    assert got.mail_from == USER
    assert f"\r\nFrom: Billing Team <{USER}>\r\n".encode() in b"\r\n" + got.data
    assert f"Reply-To: Billing Team <{sender}>\r\n".encode() in got.data
    assert got.data.count(b"From:") == 1 and b"\r\n\r\nHello.\r\n" in got.data
    rewritten = [e for e in logs if e["event"] == "message.from_rewritten"]
    assert rewritten and rewritten[0]["sent_as"] == USER and rewritten[0]["upstream"] == "gw"


async def test_a_dkim_signed_message_is_not_rewritten_and_the_log_says_so(tmp_path, pki, sink):
    """A DKIM-Signature field: From and envelope stay as they were; message.rewrite_skipped."""
    cfg = load(tmp_path, upstreams=[entry("gw", sink, pki, from_policy="rewrite")])
    sender = "billing@shop.example"
    signed = body(
        sender, "dkim", extra="DKIM-Signature: v=1; a=rsa-sha256; d=shop.example;\r\n\tb=abc\r\n"
    )
    with capture_logs() as logs:
        async with running(cfg) as d:
            code, _ = await submit(d.address[1], sender, ["u@example.org"], signed)
            assert code == 250
            await eventually(lambda: sink.messages)
    got = sink.messages[0]
    assert got.mail_from == sender
    assert f"From: Billing Team <{sender}>".encode() in got.data and b"Reply-To" not in got.data
    assert any(e["event"] == "message.rewrite_skipped" for e in logs)


async def test_m365_preset_uses_starttls_and_at_most_three_sessions(tmp_path, pki):
    """preset m365 (host and port pointed at a STARTTLS sink): every session upgraded, <= 3."""
    sink = await start_sink(Sink(), None, starttls_ctx=pki.server_ctx)
    cfg = load(
        tmp_path,
        upstreams=[
            {
                "name": "office",
                "preset": "m365",
                "host": "127.0.0.1",
                "port": sink.port,
                "ca_file": str(pki.ca_file),
                "username": USER,
                "password": PASSWORD,
                # The preset's 30/minute would make 30 messages take a minute; this test is
                # about TLS and sessions, so it says "no rate" (the daily quota stays).
                "rate": "none",
            }
        ],
    )
    up = cfg.upstreams[0]
    assert (up.tls, up.max_connections, up.rate) == ("starttls", 3, "")
    try:
        async with running(cfg) as d:
            sends = [
                submit(d.address[1], USER, ["u@example.org"], body(USER, f"o{i}"))
                for i in range(30)
            ]
            assert [c for c, _ in await asyncio.gather(*sends)] == [250] * 30
            await eventually(lambda: len(sink.messages) == 30, timeout=20)
        assert all(m.tls for m in sink.messages)
        assert 2 <= sink.peak <= 3, sink.peak
    finally:
        await stop_sink(sink)


async def test_sighup_reload_replaces_the_upstreams_and_their_workers(tmp_path, pki):
    """Reload with a new list: the next message goes to the new upstream, none to the old."""
    from relayd.app import Daemon

    old, new = await two_sinks(pki)
    load(tmp_path, upstreams=[entry("old", old, pki)])
    path = tmp_path / "relayd.yaml"
    cfg = config_mod.load(path, {})
    daemon = Daemon(cfg, str(path), False, {}, signals=False)
    task = asyncio.create_task(daemon.run())
    try:
        await eventually(lambda: daemon.started.is_set())
        port = daemon.address[1]
        assert (await submit(port, USER, ["u@example.org"], body(USER, "before")))[0] == 250
        await eventually(lambda: old.messages)
        load(
            tmp_path,
            upstreams=[
                entry("new", new, pki, username=USER2, password=PASSWORD2, max_connections=2)
            ],
        )
        await daemon.reload()
        assert (await submit(port, USER, ["u@example.org"], body(USER, "after")))[0] == 250
        await eventually(lambda: new.messages)
        assert len(old.messages) == 1 and new.logins == [USER2]
        assert [u["name"] for u in daemon.relay.snapshot().upstreams] == ["new"]
    finally:
        daemon.stop.set()
        await asyncio.wait_for(task, 30)
        await stop_sink(old)
        await stop_sink(new)


async def test_a_route_on_the_header_from_is_decided_after_data(tmp_path, pki):
    """match.from: the header From picks the upstream; a From no route takes gets 550 at DATA."""
    main, news = await two_sinks(pki)
    cfg = load(
        tmp_path,
        upstreams=[
            entry("main", main, pki),
            entry("news", news, pki, username=USER2, password=PASSWORD2),
        ],
        routes=[
            {"match": {"from": "*@news.example.com"}, "via": ["news"]},
            {"match": {"from": "*@example.com"}, "via": ["main"]},
        ],
    )
    try:
        async with running(cfg) as d:
            port = d.address[1]
            sender = "bounce@mailer.example.net"  # the envelope says little; the From decides
            news_msg = body("letters@news.example.com", "n1")
            assert (await submit(port, sender, ["u@example.org"], news_msg))[0] == 250
            assert (await submit(port, sender, ["u@example.org"], body(USER, "m1")))[0] == 250
            code, text = await submit(port, sender, ["u@example.org"], body("x@other.org", "x"))
            assert code == 550 and "no route matches" in text
            await eventually(lambda: len(main.messages) == 1 and len(news.messages) == 1)
        assert b"Subject: n1" in news.messages[0].data and b"Subject: m1" in main.messages[0].data
        assert list((tmp_path / "spool" / "queue").iterdir()) == []
    finally:
        await stop_sink(main)
        await stop_sink(news)


async def test_an_open_upstream_is_probed_by_one_session_not_one_per_queued_message(tmp_path, pki):
    """Ten messages wait on an open upstream: each cooldown ends in one probe session."""
    from faults import FaultServer

    async with FaultServer(pki) as fs:
        fs.fail("auth_535")
        cfg = load(
            tmp_path,
            upstreams=[
                {
                    **entry("only", Sink(port=fs.port), pki),
                    "failure_threshold": 1,
                    "cooldown": 0.2,
                    "max_cooldown": 0.2,
                }
            ],
        )
        with capture_logs() as logs:
            async with running(cfg) as d:
                sends = [
                    submit(d.address[1], USER, ["u@example.org"], body(USER, f"p{i}"))
                    for i in range(10)
                ]
                assert [c for c, _ in await asyncio.gather(*sends)] == [250] * 10

                def probes() -> int:
                    return sum(
                        1
                        for e in logs
                        if e["event"] == "upstream.state_changed" and e["state"] == "half_open"
                    )

                await eventually(lambda: probes() >= 3, what="three probes")
                sessions, seen = fs.sessions, probes()
                await eventually(lambda: probes() >= seen + 3, what="three more probes")
                # One session per probe (one may be connecting while we count), where the
                # backlog dialling at each cooldown's end would be ten.
                assert abs((fs.sessions - sessions) - (probes() - seen)) <= 1
        assert fs.messages == []
