"""Envelope addresses the provider could never be given: refused at MAIL/RCPT, not spooled.

A control character (C0, DEL, C1) or bytes that are not UTF-8 in an address used to get 250 at
DATA and then sit in the queue for ever: the client library refuses such an argument at every
attempt. RFC 3463: X.1.7 is "bad sender's mailbox address syntax" (sent with 501, a syntax
error in the parameters), X.1.3 "bad destination mailbox address syntax" (with 553, "mailbox
name not allowed", RFC 5321 §4.2.2).
"""

from __future__ import annotations

import pytest
from conftest import eventually, free_port, message
from proc import ServeProcess, serve_env
from rawsmtp import Wire

BAD = [
    ("esc", b"a\x1bb@example.org"),
    ("esc-csi", b"a\x1b[2Jb@example.org"),
    ("osc-title", b"a\x1b]0;pwned\x07b@example.org"),
    ("nul", b"a\x00b@example.org"),
    ("tab", b"a\tb@example.org"),
    ("del", b"a\x7fb@example.org"),
    ("c1-csi", "a\x9bb@example.org".encode()),
    ("not-utf8", b"a\xffb@example.org"),
    ("utf8-surrogate", b"a\xed\xa0\x80b@example.org"),
]


@pytest.fixture
async def daemon(tmp_path, pki, sink):
    proc = await ServeProcess(serve_env(tmp_path / "spool", sink.port, pki.ca_file)).start()
    try:
        yield proc
    finally:
        assert await proc.stop() == 0


async def test_a_bad_sender_address_gets_501_5_1_7_at_mail(daemon, sink):
    """MAIL FROM with a control character or non-UTF-8 bytes: 501 5.1.7, each of them, and
    the session goes on: the next, clean transaction is accepted and delivered."""
    wire = await Wire.open(daemon.port)
    try:
        await wire.greet()
        for name, address in BAD:
            code, text = await wire.cmd(b"MAIL FROM:<" + address + b">")
            assert (code, text[:5]) == (501, "5.1.7"), (name, code, text)
        assert (await wire.cmd(b"MAIL FROM:<app@example.com>"))[0] == 250
        assert (await wire.cmd(b"RCPT TO:<u@example.org>"))[0] == 250
        assert (await wire.cmd(b"DATA"))[0] == 354
        assert (await wire.cmd(message("clean") + b".\r\n"))[0] == 250
    finally:
        wire.close()
    await eventually(lambda: sink.messages, what="the clean message delivered")
    assert [m.mail_from for m in sink.messages] == ["app@example.com"]


async def test_a_bad_recipient_address_gets_553_5_1_3_at_rcpt(daemon, sink):
    """RCPT TO with a control character or non-UTF-8 bytes: 553 5.1.3, each of them; the good
    recipient of the same transaction is kept, and only it is delivered."""
    wire = await Wire.open(daemon.port)
    try:
        await wire.greet()
        assert (await wire.cmd(b"MAIL FROM:<app@example.com>"))[0] == 250
        for name, address in BAD:
            code, text = await wire.cmd(b"RCPT TO:<" + address + b">")
            assert (code, text[:5]) == (553, "5.1.3"), (name, code, text)
        assert (await wire.cmd(b"RCPT TO:<u@example.org>"))[0] == 250
        assert (await wire.cmd(b"DATA"))[0] == 354
        assert (await wire.cmd(message("one-good") + b".\r\n"))[0] == 250
    finally:
        wire.close()
    await eventually(lambda: sink.messages, what="delivery")
    assert [m.rcpt_tos for m in sink.messages] == [["u@example.org"]]


async def test_a_utf8_address_is_still_accepted(daemon, sink):
    """Non-ASCII but valid UTF-8 (SMTPUTF8, RFC 6531) is not a control character: 250."""
    wire = await Wire.open(daemon.port)
    try:
        await wire.greet()
        mail = "MAIL FROM:<jos\u00e9@example.com> SMTPUTF8".encode()
        assert (await wire.cmd(mail))[0] == 250
        assert (await wire.cmd("RCPT TO:<\u00fcser@example.org>".encode()))[0] == 250
    finally:
        wire.close()


async def test_sendmail_does_not_maildrop_a_bad_address_either(tmp_path, pki):
    """relayd-sendmail with the daemon down (so it would write the spool itself) and a sender
    with ESC in it: exit 65 (EX_DATAERR), one line with the address escaped, nothing queued."""
    from test_cli_sendmail import run_sendmail

    spool = tmp_path / "spool"
    env = serve_env(spool, free_port(), pki.ca_file, listen_port=str(free_port()))
    letter = b"To: ann@example.org\nSubject: hi\n\nhello\n"
    code, err = await run_sendmail(env, letter, "-t", "-f", "a\x1b[2Jb@example.com")
    assert code == 65, err
    assert "\x1b" not in err and "a\\x1b[2Jb@example.com" in err, err
    queued = list((spool / "queue").glob("*.eml")) if (spool / "queue").is_dir() else []
    assert queued == []
