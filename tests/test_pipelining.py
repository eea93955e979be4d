"""PIPELINING and CHUNKING upstream: flights in one write, replies mapped to their commands,
BDAT refused -> DATA, a drop mid-flight loses nothing, no extensions -> lock-step."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import Pki, eventually, make_config, message, queue_files, running, submit
from pipeserver import PipeServer

from relayd.config import Config
from relayd.errors import UpstreamError
from relayd.spool import Spool
from relayd.states import SpoolDir
from relayd.upstream import Session, Submission


@pytest.fixture
async def upstream(pki: Pki) -> AsyncIterator[PipeServer]:
    srv = await PipeServer().start(pki.server_ctx)
    yield srv
    await srv.stop()


def submissions(*rcpts: tuple[str, ...]) -> list[Submission]:
    return [
        Submission("app@example.com", r, message(f"m{i}")) for i, r in enumerate(rcpts, start=1)
    ]


async def session_to(tmp_path: Path, srv: PipeServer, pki: Pki) -> Session:
    session = Session(make_config(tmp_path, srv.port, pki.ca_file).upstream, "client.test")
    await session.open()
    return session


async def test_a_flight_of_three_messages_goes_in_one_write(tmp_path, pki, upstream):
    """MAIL, RCPT and BDAT LAST of three messages reach the server in one recv; all deliver."""
    session = await session_to(tmp_path, upstream, pki)
    try:
        results = await session.send_many(submissions(("a@x.org",), ("b@x.org",), ("c@x.org",)))
    finally:
        await session.close()
    assert [[o.status for o in r] for r in results if isinstance(r, list)] == [["delivered"]] * 3
    [flight] = upstream.with_mail()
    assert flight.count(b"MAIL FROM:") == 3 and flight.count(b" LAST\r\n") == 3
    assert upstream.commands[2:] == ["MAIL", "RCPT", "BDAT"] * 3 + ["QUIT"]
    assert [g.how for g in upstream.messages] == ["BDAT"] * 3


async def test_a_reply_that_arrives_in_pieces_is_read_whole(tmp_path, pki, upstream):
    """Every reply split in two writes 10 ms apart: a flight of two still maps exactly."""
    upstream.split = True
    upstream.rcpt_replies = {"gone@x.org": "550 5.1.1 gone"}
    session = await session_to(tmp_path, upstream, pki)
    try:
        results = await session.send_many(submissions(("a@x.org", "gone@x.org"), ("b@x.org",)))
    finally:
        await session.close()
    seen = [[(o.address, o.code) for o in r] for r in results if isinstance(r, list)]
    assert seen == [[("gone@x.org", 550), ("a@x.org", 250)], [("b@x.org", 250)]]


async def test_mixed_rcpt_replies_in_one_flight_land_on_their_recipients(tmp_path, pki, upstream):
    """250 / 450 / 550 to RCPTs of two pipelined messages: each recipient gets its own reply."""
    upstream.rcpt_replies = {"soft@x.org": "450 4.2.1 try later", "gone@x.org": "550 5.1.1 gone"}
    session = await session_to(tmp_path, upstream, pki)
    try:
        results = await session.send_many(
            submissions(("ok1@x.org", "soft@x.org"), ("gone@x.org", "ok2@x.org", "soft@x.org"))
        )
    finally:
        await session.close()
    seen = [{o.address: (o.status, o.code, o.step) for o in r} for r in results]
    assert seen == [
        {"ok1@x.org": ("delivered", 250, "bdat"), "soft@x.org": ("temporary", 450, "rcpt")},
        {
            "gone@x.org": ("permanent", 550, "rcpt"),
            "ok2@x.org": ("delivered", 250, "bdat"),
            "soft@x.org": ("temporary", 450, "rcpt"),
        },
    ]
    assert [g.rcpt_tos for g in upstream.messages] == [["ok1@x.org"], ["ok2@x.org"]]
    assert len(upstream.with_mail()) == 1


async def test_without_chunking_each_body_carries_the_next_transaction(tmp_path, pki, upstream):
    """PIPELINING, no CHUNKING: the body and final dot of message n travel in one write with
    MAIL, RCPT and DATA of message n+1: one round trip per message."""
    upstream.chunking = False
    session = await session_to(tmp_path, upstream, pki)
    try:
        results = await session.send_many(submissions(("a@x.org",), ("b@x.org",), ("c@x.org",)))
    finally:
        await session.close()
    assert [[o.status for o in r] for r in results if isinstance(r, list)] == [["delivered"]] * 3
    assert [g.how for g in upstream.messages] == ["DATA"] * 3
    first, second, third, last, quit_ = upstream.recvs
    assert first == b"MAIL FROM:<app@example.com>\r\nRCPT TO:<a@x.org>\r\nDATA\r\n"
    assert b"Subject: m1" in second and second.endswith(b"\r\n.\r\n" + first.replace(b"a@", b"b@"))
    assert b"Subject: m2" in third and third.endswith(first.replace(b"a@", b"c@"))
    assert b"Subject: m3" in last and quit_ == b"QUIT\r\n"


async def test_every_rcpt_refused_sends_no_data_body(tmp_path, pki, upstream):
    """DATA path: all RCPTs refused, DATA answered 554; the body is never sent (RFC 2920)."""
    upstream.chunking = False
    upstream.rcpt_replies = {"gone@x.org": "550 5.1.1 gone"}
    session = await session_to(tmp_path, upstream, pki)
    try:
        refused = Submission("app@example.com", ("gone@x.org",), message("refused"))
        [result] = await session.send_many([refused])
        [again] = await session.send_many([Submission("app@example.com", ("ok@x.org",), message())])
    finally:
        await session.close()
    assert isinstance(result, list) and isinstance(again, list)
    assert [(o.status, o.code) for o in result] == [("permanent", 550)]
    assert [o.status for o in again] == ["delivered"]
    assert upstream.commands[2:] == ["MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA", "QUIT"]
    assert b"Subject: refused" not in b"".join(upstream.recvs)


async def test_a_refused_bdat_is_sent_again_with_data(tmp_path, pki, upstream):
    """5xx to BDAT (recipient accepted): that message goes again with DATA; the rest of the
    flight is unaffected, and once DATA worked where BDAT did not, DATA it is."""
    upstream.bdat_replies = ["554 5.5.1 BDAT broken here"]
    session = await session_to(tmp_path, upstream, pki)
    try:
        results = await session.send_many(submissions(("a@x.org",), ("b@x.org",)))
        [later] = await session.send_many(submissions(("c@x.org",)))
    finally:
        await session.close()
    assert [[o.status for o in r] for r in [*results, later] if isinstance(r, list)] == [
        ["delivered"]
    ] * 3
    assert [(g.rcpt_tos, g.how) for g in upstream.messages] == [
        (["b@x.org"], "BDAT"),
        (["a@x.org"], "DATA"),
        (["c@x.org"], "DATA"),
    ]
    assert upstream.commands[2:11] == ["MAIL", "RCPT", "BDAT"] * 2 + ["MAIL", "RCPT", "DATA"]


async def test_a_transaction_left_open_by_a_refusal_does_not_swallow_the_next(
    tmp_path, pki, upstream
):
    """A server that keeps a refused BDAT's transaction open refuses the next MAIL as nested
    (503): that message is sent again after RSET, delivered once, to its own recipient."""
    upstream.bdat_replies = ["552 5.3.4 too big today"]
    upstream.keep_refused = True
    session = await session_to(tmp_path, upstream, pki)
    try:
        results = await session.send_many(submissions(("a@x.org",), ("b@x.org",)))
    finally:
        await session.close()
    assert [[o.status for o in r] for r in results if isinstance(r, list)] == [["delivered"]] * 2
    assert sorted((g.rcpt_tos[0], g.data.count(b"Subject:")) for g in upstream.messages) == [
        ("a@x.org", 1),
        ("b@x.org", 1),
    ]
    assert [g.mail_from for g in upstream.messages] == ["app@example.com"] * 2


async def test_a_drop_mid_flight_leaves_the_unconfirmed_messages_unsent(tmp_path, pki, upstream):
    """The session dies instead of answering message 2: 1 is delivered, 2 and 3 get the error."""
    upstream.drop_at = 2
    session = await session_to(tmp_path, upstream, pki)
    try:
        results = await session.send_many(submissions(("a@x.org",), ("b@x.org",), ("c@x.org",)))
    finally:
        await session.close()
    assert isinstance(results[0], list) and results[0][0].status == "delivered"
    assert all(isinstance(r, UpstreamError) and r.temporary for r in results[1:])


async def test_a_drop_mid_flight_loses_nothing_in_the_daemon(tmp_path, pki, upstream):
    """Five queued messages, one flight, the session drops at the second body: every message
    still arrives and the spool empties (at least once)."""
    upstream.drop_at = 2
    cfg = await queued(tmp_path, upstream, pki, 5)
    async with running(cfg):
        await eventually(lambda: not queue_files(cfg), timeout=20, what="spool emptied")
    subjects = {g.data.split(b"Subject: ")[1].split(b"\r\n")[0] for g in upstream.messages}
    assert subjects == {b"q%d" % i for i in range(5)}
    assert upstream.sessions == 2


async def test_due_messages_go_out_in_flights_within_the_session_cap(tmp_path, pki, upstream):
    """Five messages queued, max_messages_per_session 2: three sessions, flights of 2, 2, 1."""
    cfg = await queued(tmp_path, upstream, pki, 5, upstream_max_messages_per_session=2)
    async with running(cfg):
        await eventually(lambda: not queue_files(cfg), timeout=20, what="spool emptied")
    assert [r.count(b"MAIL FROM:") for r in upstream.with_mail()] == [2, 2, 1]
    assert upstream.sessions == 3 and len(upstream.messages) == 5


async def test_a_server_offering_neither_gets_the_lockstep_dialogue(tmp_path, pki, upstream):
    """No PIPELINING, no CHUNKING: every command waits for its reply, body by DATA."""
    upstream.pipelining = upstream.chunking = False
    session = await session_to(tmp_path, upstream, pki)
    try:
        results = await session.send_many(submissions(("a@x.org", "b@x.org"), ("c@x.org",)))
    finally:
        await session.close()
    assert all(isinstance(r, list) and r[0].status == "delivered" for r in results)
    commands = [r.rstrip() for r in upstream.recvs if not r.startswith(b"From:")]
    assert [r.split(b" ")[0] for r in commands] == [
        b"MAIL",
        b"RCPT",
        b"RCPT",
        b"DATA",
        b"MAIL",
        b"RCPT",
        b"DATA",
        b"QUIT",
    ]
    assert not any(b"\r\n" in r for r in commands)  # one command per recv


async def test_data_is_dot_stuffed_and_bdat_is_not(tmp_path, pki, upstream):
    """Lines starting with a dot: doubled on the wire with DATA, sent as stored with BDAT;
    bare LF line ends become CRLF either way."""
    body = b"Subject: dots\n\n.hidden\r\n..two\r\nend\n"
    want = b"Subject: dots\r\n\r\n.hidden\r\n..two\r\nend\r\n"
    session = await session_to(tmp_path, upstream, pki)
    try:
        await session.send_many([Submission("app@example.com", ("a@x.org",), body)])
        session.channel.chunking = False  # type: ignore[union-attr]  # the DATA path, same server
        await session.send_many([Submission("app@example.com", ("a@x.org",), body)])
    finally:
        await session.close()
    bdat, data = upstream.messages
    assert (bdat.how, bdat.wire, bdat.data) == ("BDAT", want, want)
    assert data.how == "DATA" and data.data == want
    assert data.wire == b"Subject: dots\r\n\r\n..hidden\r\n...two\r\nend\r\n.\r\n"


async def queued(tmp_path: Path, srv: PipeServer, pki: Pki, n: int, **env: str) -> Config:
    """n messages spooled while the upstream was unreachable, all due now; the config now
    points at srv, with one upstream connection (so what is due shares a session)."""
    down = make_config(tmp_path, 1, pki.ca_file, retry_initial_delay="3600", retry_max_delay="3600")
    async with running(down) as d:
        for i in range(n):
            code, _ = await submit(d.address[1], "app@example.com", ["u@x.org"], message(f"q{i}"))
            assert code == 250
        await eventually(lambda: d.relay.snapshot().in_flight == 0, what="deferred")
    spool = Spool(down.spool.path)
    for msg_id in {name.split(".json")[0] for name in queue_files(down) if ".json" in name}:
        spool.retry(msg_id, time.time(), down.retry.max_age)
    return make_config(tmp_path, srv.port, pki.ca_file, upstream_max_connections="1", **env)


async def test_a_flight_carries_only_what_pacing_grants_now(tmp_path, pki, upstream):
    """Six due messages, burst 3 at 1/minute, one connection: one flight of three; the other
    three stay queued without an attempt, waiting for the rate."""
    cfg = await queued(tmp_path, upstream, pki, 6, upstream_rate="1/minute", upstream_burst="3")
    before = {e.id: e.attempts for e in Spool(cfg.spool.path).scan(SpoolDir.QUEUE)}
    async with running(cfg) as d:
        await eventually(lambda: len(upstream.messages) == 3, what="the burst delivered")
        await eventually(lambda: "rate" in d.relay.provider.waiting, what="the rest waiting")
    assert [r.count(b"MAIL FROM:") for r in upstream.with_mail()] == [3]
    left = list(Spool(cfg.spool.path).scan(SpoolDir.QUEUE))
    assert len(left) == 3 and all(e.attempts == before[e.id] for e in left)


async def test_a_quota_reply_in_a_flight_holds_only_its_message(tmp_path, pki, upstream):
    """Gmail's daily limit answers the first BDAT of a flight of three: that message is held
    (queued, no attempt, not re-sent by DATA), the two answered 250 are delivered once, the
    upstream is paused and nothing is in failed/."""
    upstream.bdat_replies = ["550 5.4.5 Daily user sending limit exceeded."]
    cfg = await queued(tmp_path, upstream, pki, 3)
    before = {e.id: e.attempts for e in Spool(cfg.spool.path).scan(SpoolDir.QUEUE)}
    async with running(cfg) as d:
        await eventually(lambda: d.relay.snapshot().upstream["state"] == "paused", what="the pause")
        await eventually(lambda: d.relay.depth == 1, what="the two others delivered")
    assert len(upstream.messages) == 2 and upstream.commands.count("DATA") == 0
    (held,) = Spool(cfg.spool.path).scan(SpoolDir.QUEUE)
    assert held.attempts == before[held.id] and held.last_error["action"] == "pause"
    assert not list(Spool(cfg.spool.path).scan(SpoolDir.FAILED))
