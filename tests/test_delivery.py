"""The core promise end to end: listener -> spool -> verified implicit TLS upstream."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import (
    PASSWORD,
    USER,
    Sink,
    eventually,
    free_port,
    make_config,
    make_pki,
    message,
    queue_files,
    running,
    start_sink,
    stop_sink,
    submit,
)
from structlog.testing import capture_logs


async def first_error(cfg):
    """Wait for the queued message's first failed attempt; its last_error."""
    spool = Path(cfg.spool.path) / "queue"

    def failed_once():
        files = list(spool.glob("*.json"))
        return files and json.loads(files[0].read_text())["last_error"]

    return await eventually(failed_once, what="a failed attempt")


async def test_bytes_envelope_and_auth_reach_the_upstream(tmp_path, pki, sink):
    """The upstream gets the exact bytes, the envelope sender, every recipient, via AUTH."""
    cfg = make_config(tmp_path, sink.port, pki.ca_file)
    data = message("exact") + b"line two\r\n..leading dot\r\n\xc3\xa9 8-bit\r\n"
    rcpts = ["a@example.org", "b@example.org", "c@example.net"]
    async with running(cfg) as d:
        code, text = await submit(d.address[1], "app@example.com", rcpts, data)
        assert code == 250 and "queued as" in text
        await eventually(lambda: sink.messages, what="delivery")
        await eventually(lambda: not queue_files(cfg), what="spool emptied")
    got = sink.messages[0]
    assert got.data == data
    assert got.mail_from == "app@example.com"
    assert got.rcpt_tos == rcpts
    assert got.login == USER
    assert sink.logins == [USER]


async def test_upstream_down_then_back_delivers_with_retries(tmp_path, pki):
    """With the upstream down the message stays queued; when it returns it goes out."""
    port = free_port()
    cfg = make_config(tmp_path, port, pki.ca_file)
    async with running(cfg) as d:
        code, _ = await submit(d.address[1], "app@example.com", ["u@example.org"], message())
        assert code == 250
        spool = Path(cfg.spool.path)

        def attempted() -> bool:
            files = list((spool / "queue").glob("*.json"))
            return bool(files) and json.loads(files[0].read_text())["attempts"] >= 2

        await eventually(attempted, what="two failed attempts")
        env = json.loads(next((spool / "queue").glob("*.json")).read_text())
        assert env["last_error"]["step"] == "connect"
        sink = await start_sink(Sink(), pki.server_ctx, port=port)
        try:
            await eventually(lambda: sink.messages, what="delivery after recovery")
            await eventually(lambda: not queue_files(cfg), what="spool emptied")
        finally:
            await stop_sink(sink)


async def test_4xx_after_data_is_retried_with_growing_delay(tmp_path, pki, sink):
    """451 after DATA defers; each retry waits longer than the one before."""
    sink.data_replies = ["451 4.3.0 try later"] * 3
    cfg = make_config(tmp_path, sink.port, pki.ca_file, retry_max_delay="5")
    with capture_logs() as logs:
        async with running(cfg) as d:
            await submit(d.address[1], "app@example.com", ["u@example.org"], message())
            await eventually(lambda: sink.messages, what="delivery after three 451s")
    deferred = [e for e in logs if e["event"] == "delivery.deferred"]
    assert [e["code"] for e in deferred] == [451, 451, 451]
    delays = [e["retry_in"] for e in deferred]
    assert delays[0] < delays[1] < delays[2], delays
    sent = [e for e in logs if e["event"] == "delivery.sent"]
    assert sent[0]["attempt"] == 4


async def test_5xx_after_data_moves_message_to_failed(tmp_path, pki, sink):
    """A permanent refusal ends in failed/ with the upstream's reply."""
    sink.data_replies = ["554 5.7.1 message rejected as spam"]
    cfg = make_config(tmp_path, sink.port, pki.ca_file)
    async with running(cfg) as d:
        await submit(d.address[1], "app@example.com", ["u@example.org"], message())
        await eventually(lambda: len(queue_files(cfg, "failed")) == 2, what="failed/ pair")
    env = json.loads(next((Path(cfg.spool.path) / "failed").glob("*.json")).read_text())
    assert env["rcpt_to"][0]["state"] == "failed"
    assert env["rcpt_to"][0]["code"] == 554
    assert "spam" in env["reason"]
    assert queue_files(cfg) == []
    assert sink.messages == []


async def test_one_refused_recipient_does_not_stop_the_others(tmp_path, pki, sink):
    """550 for one RCPT: the others are delivered, the refusal is recorded in failed/."""
    sink.rcpt_replies = {"gone@example.org": "550 5.1.1 no such user"}
    cfg = make_config(tmp_path, sink.port, pki.ca_file)
    async with running(cfg) as d:
        await submit(
            d.address[1],
            "app@example.com",
            ["a@example.org", "gone@example.org", "b@example.org"],
            message(),
        )
        await eventually(lambda: len(queue_files(cfg, "failed")) == 2, what="failed/ pair")
    assert sink.messages[0].rcpt_tos == ["a@example.org", "b@example.org"]
    env = json.loads(next((Path(cfg.spool.path) / "failed").glob("*.json")).read_text())
    states = {r["address"]: r["state"] for r in env["rcpt_to"]}
    assert states == {
        "a@example.org": "delivered",
        "gone@example.org": "failed",
        "b@example.org": "delivered",
    }
    assert "gone@example.org: 550" in env["reason"]


async def test_expired_message_moves_to_failed(tmp_path, pki):
    """A message older than retry.max_age is moved to failed/ as expired."""
    cfg = make_config(tmp_path, free_port(), pki.ca_file, retry_max_age="0.3")
    async with running(cfg) as d:
        await submit(d.address[1], "app@example.com", ["u@example.org"], message())
        await eventually(lambda: len(queue_files(cfg, "failed")) == 2, what="expiry")
    env = json.loads(next((Path(cfg.spool.path) / "failed").glob("*.json")).read_text())
    assert env["reason"].startswith("expired after")
    assert env["attempts"] >= 1


async def test_untrusted_certificate_sends_nothing(tmp_path, pki, sink):
    """A certificate from an unknown CA: no AUTH, no MAIL, the message stays queued."""
    other = make_pki(tmp_path, "127.0.0.1")
    cfg = make_config(tmp_path, sink.port, other.ca_file)
    async with running(cfg) as d:
        await submit(d.address[1], "app@example.com", ["u@example.org"], message())
        err = await first_error(cfg)
    assert err["step"] == "tls" and "certificate verify failed" in err["text"]
    assert sink.mail_commands == 0 and sink.logins == [] and sink.auth_failures == 0
    assert len(queue_files(cfg)) == 2


async def test_wrong_host_certificate_sends_nothing(tmp_path, sink):
    """A trusted certificate for another host name is refused like an untrusted one."""
    wrong = make_pki(tmp_path, "mail.other.example")
    s = await start_sink(Sink(), wrong.server_ctx)
    try:
        cfg = make_config(tmp_path, s.port, wrong.ca_file)
        async with running(cfg) as d:
            await submit(d.address[1], "app@example.com", ["u@example.org"], message())
            err = await first_error(cfg)
        assert err["step"] == "tls"
        assert s.mail_commands == 0 and s.logins == []
    finally:
        await stop_sink(s)


async def test_starttls_not_offered_never_falls_back_to_plaintext(tmp_path):
    """tls: starttls against a server without STARTTLS: nothing is sent in plaintext."""
    plain = await start_sink(Sink(), None)
    try:
        cfg = make_config(tmp_path, plain.port, None, upstream_tls="starttls")
        async with running(cfg) as d:
            await submit(d.address[1], "app@example.com", ["u@example.org"], message())
            err = await first_error(cfg)
        assert err["step"] == "tls" and "STARTTLS" in err["text"]
        assert plain.mail_commands == 0 and plain.logins == [] and plain.auth_failures == 0
    finally:
        await stop_sink(plain)


async def test_wrong_password_keeps_mail_queued_and_says_why(tmp_path, pki, sink):
    """535 on AUTH defers (as Postfix soft-bounces) and logs an error with a hint."""
    sink.password = "something-else"
    cfg = make_config(tmp_path, sink.port, pki.ca_file)
    with capture_logs() as logs:
        async with running(cfg) as d:
            await submit(d.address[1], "app@example.com", ["u@example.org"], message())
            await eventually(lambda: sink.auth_failures >= 1, what="an AUTH attempt")
            await eventually(lambda: any(e["event"] == "delivery.deferred" for e in logs))
    auth = [e for e in logs if e["event"] == "upstream.auth_failed"]
    assert auth and auth[0]["code"] == 535 and auth[0]["hint"]
    assert len(queue_files(cfg)) == 2 and queue_files(cfg, "failed") == []
    assert PASSWORD not in repr(logs)


async def test_one_session_carries_many_messages(tmp_path, pki, sink):
    """With max_connections 1, a burst goes out over a single login, RSET between messages."""
    cfg = make_config(tmp_path, sink.port, pki.ca_file, upstream_max_connections="1")
    async with running(cfg) as d:
        for i in range(10):
            code, _ = await submit(
                d.address[1], "app@example.com", ["u@example.org"], message(f"burst{i}")
            )
            assert code == 250
        await eventually(lambda: len(sink.messages) == 10, what="10 deliveries")
    assert sink.logins == [USER]
    assert sink.sessions == 1


def test_backoff_doubles_with_jitter_up_to_the_cap():
    """backoff(n) is initial * 2^(n-1) within ±25 %, never above max_delay."""
    from relayd.outcome import backoff

    assert backoff(1, 60, 3600, rand=0.5) == 60
    assert backoff(3, 60, 3600, rand=0.5) == 240
    assert backoff(2, 60, 3600, rand=0.0) == 90
    assert backoff(2, 60, 3600, rand=1.0) == 150
    assert backoff(30, 60, 3600, rand=1.0) == 3600


async def test_session_closed_by_provider_while_idle_is_replaced_without_deferral(
    tmp_path, pki, sink
):
    """The provider drops an idle session: the next message goes out on a new one, first try."""
    from conftest import drop_sessions

    cfg = make_config(tmp_path, sink.port, pki.ca_file, upstream_max_connections="1")
    with capture_logs() as logs:
        async with running(cfg) as d:
            await submit(d.address[1], "app@example.com", ["u@example.org"], message("one"))
            await eventually(lambda: len(sink.messages) == 1, what="first delivery")
            drop_sessions(sink)
            await submit(d.address[1], "app@example.com", ["u@example.org"], message("two"))
            await eventually(lambda: len(sink.messages) == 2, what="second delivery")
    assert not [e for e in logs if e["event"] == "delivery.deferred"]
    assert [e["attempt"] for e in logs if e["event"] == "delivery.sent"] == [1, 1]
    assert len(sink.logins) == 2


async def test_ehlo_advertises_the_promised_extensions(tmp_path, pki, sink):
    """EHLO names the host and offers SIZE, 8BITMIME, PIPELINING and SMTPUTF8."""
    import aiosmtplib

    cfg = make_config(tmp_path, sink.port, pki.ca_file, listen_hostname="relay.example.test")
    async with running(cfg) as d:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=d.address[1], start_tls=False, local_hostname="client.test"
        )
        await client.connect()
        reply = await client.ehlo()
        extensions = dict(client.esmtp_extensions)
        client.close()
    assert reply.message.splitlines()[0] == "relay.example.test"
    assert {"size", "8bitmime", "pipelining", "smtputf8"} <= set(extensions)
    assert extensions["size"] == str(cfg.listen.max_message_size)
