"""`relayd-sendmail`: hands mail to the daemon, or to the spool when the daemon is down."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from conftest import eventually, free_port
from proc import ServeProcess, serve_env

from relayd.cli import sendmail

SCRIPT = Path(sys.executable).parent / "relayd-sendmail"


async def run_sendmail(env: dict[str, str], stdin: bytes, *args: str) -> tuple[int, str]:
    """Run the installed relayd-sendmail script; returns (exit code, stderr)."""
    cmd = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "relayd", "sendmail"]
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        *args,
        env={**os.environ, **env},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(stdin), 30)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


def letter(subject: str) -> bytes:
    # What cron or PHP's mail() pipes in: LF line ends, a Bcc to hide, no Date or Message-ID.
    return (
        f"To: Ann <ann@example.org>\nCc: bob@example.org\nBcc: secret@example.org\n"
        f"Subject: {subject}\n\nhello\n.\nafter a lone dot\n"
    ).encode()


async def test_sendmail_t_delivers_with_the_daemon_down_and_up(tmp_path, pki, sink):
    """-t with no daemon drops into the spool; the daemon sends it at start; then via SMTP."""
    spool = tmp_path / "spool"
    env = serve_env(spool, sink.port, pki.ca_file, listen_port=str(free_port()))
    code, err = await run_sendmail(env, letter("while down"), "-t", "-i", "-f", "cron@example.com")
    assert code == 0, err
    assert len(list((spool / "queue").glob("*.eml"))) == 1  # maildropped, daemon not running
    proc = await ServeProcess(env).start()
    try:
        await eventually(lambda: sink.messages, what="maildropped message sent at start")
        code, err = await run_sendmail(env, letter("while up"), "-t", "-oi")
        assert code == 0, err
        await eventually(lambda: len(sink.messages) == 2, what="message via the listener")
    finally:
        await proc.stop()
    down, up = sink.messages
    for got in (down, up):
        assert got.rcpt_tos == ["ann@example.org", "bob@example.org", "secret@example.org"]
        assert b"Bcc:" not in got.data and b"secret@" not in got.data
        assert b"\r\nafter a lone dot\r\n" in got.data and b"Message-ID: <" in got.data
    assert down.mail_from == "cron@example.com"
    assert up.mail_from == "app@example.com"  # the upstream account, the provider's sender


async def test_usage_errors_exit_64(tmp_path, pki):
    """No recipients, or an unsupported mode, is a usage error (EX_USAGE), nothing queued."""
    env = serve_env(tmp_path / "spool", free_port(), pki.ca_file)
    assert (await run_sendmail(env, b"Subject: x\n\nhi\n"))[0] == 64
    assert (await run_sendmail(env, b"", "-bp"))[0] == 64
    assert not (tmp_path / "spool").exists()


def test_without_i_a_lone_dot_ends_the_message():
    """Classic sendmail input: a line with one dot ends it unless -i/-oi is given."""
    assert sendmail.normalize(b"a\n.\nb\n", dots_end=True) == b"a\r\n"
    assert sendmail.normalize(b"a\n.\nb\n", dots_end=False) == b"a\r\n.\r\nb\r\n"


def test_strip_headers_drops_folded_bcc_only():
    """Bcc and its continuation lines go; other headers and the body stay byte for byte."""
    data = b"To: a@x\r\nBcc: b@x,\r\n c@x\r\nSubject: s\r\n\r\nBcc: body\r\n"
    assert sendmail.strip_headers(data, (b"bcc",)) == (
        b"To: a@x\r\nSubject: s\r\n\r\nBcc: body\r\n"
    )
