"""Strangers' bytes never reach the operator's terminal raw.

Envelope addresses, subjects and provider replies come from people relayd does not know. An
ESC sequence among them (`ESC[2J` clears the screen, `ESC]0;…BEL` retitles the window, the
one-byte C1 CSI U+009B does what ESC[ does) must be shown escaped, as `\\x1b[2J`, in every
human-facing output: `queue list`, `queue show`, `check`, `health` and the console log; JSON
output stays valid JSON that gives back the exact string.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
from aiosmtpd.smtp import AuthResult
from conftest import (
    SUBMITTER,
    SUBMITTER_PASSWORD,
    Sink,
    eventually,
    message,
    start_sink,
    stop_sink,
    submit,
)
from proc import ServeProcess, serve_env
from rawsmtp import Wire

from relayd import auth
from relayd.spool import Spool

CLEAR, TITLE, CSI = "\x1b[2J", "\x1b]0;pwned\x07", "\x9b2J"
HOSTILE = f"{CLEAR}{TITLE}{CSI}"
REPLY = f"451 4.3.0 busy {HOSTILE} try later"
# What a provider can send: the test upstream answers in ASCII, so C0 sequences only.
WIRE_REPLY = f"535 5.7.8 busy {CLEAR}{TITLE} try later"
LOGIN = f"evil{TITLE}"  # a submitter's login name, with no space to make it quoted
SHOWN = "busy \\x1b[2J\\x1b]0;pwned\\x07 try later"


class HostileSink(Sink):
    """An upstream that refuses every login with ESC sequences in its words."""

    def authenticate(self, *args: object) -> AuthResult:
        return AuthResult(success=False, handled=False, message=WIRE_REPLY)


@pytest.fixture
async def hostile(pki):
    s = await start_sink(HostileSink(), pki.server_ctx)
    yield s
    await stop_sink(s)


def raw_controls(text: str) -> list[str]:
    """Control characters (C0 but newline, DEL, C1) present in text as themselves."""
    return sorted({c for c in text if (ord(c) < 32 and c != "\n") or 0x7F <= ord(c) < 0xA0})


async def relayd(env: dict[str, str], *args: str) -> tuple[int, str]:
    """`relayd ARGS` in a subprocess: (exit code, stdout and stderr as one text)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relayd",
        *args,
        env={**os.environ, **env, "COLUMNS": "300"},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode("utf-8", "surrogateescape")


def plant(spool: Path) -> str:
    """A queued message with a hostile envelope and a hostile last reply, as a relayd that
    accepted such addresses (or another writer of the spool) left it; returns its id."""
    store = Spool(spool)
    store.create()
    now = time.time()
    env = store.put(
        f"evil{CLEAR}@example.com", [f"u{TITLE}@example.org"], message(f"hi {CSI}"), now
    )
    error = {"step": "data", "code": 451, "text": REPLY.removeprefix("451 "), "at": "x"}
    history = ({"attempt": 1, "at": "x", "result": "deferred", **error},)
    store.save(dataclasses.replace(env, attempts=1, last_error=error, history=history))
    return env.id


async def test_queue_list_and_show_print_control_characters_escaped(tmp_path):
    """`queue list` and `queue show`: the envelope and the reply appear as \\x1b… text; no
    ESC, BEL or C1 byte reaches the terminal."""
    spool = tmp_path / "spool"
    msg_id = plant(spool)
    env = {"RELAYD_SPOOL_PATH": str(spool)}
    for args in (["queue", "list"], ["queue", "show", msg_id]):
        code, out = await relayd(env, *args)
        assert code == 0, out
        assert raw_controls(out) == [], (args, out)
        assert "evil\\x1b[2J@example.com" in out, (args, out)
        assert "\\x1b]0;pwned\\x07" in out and "\\x9b2J" in out, (args, out)


async def test_queue_json_output_is_ascii_json_that_round_trips(tmp_path):
    """`queue list --json` and `queue show --json`: valid JSON with every control character
    escaped (C1 included: ensure_ascii), parsing back to the exact strings."""
    spool = tmp_path / "spool"
    msg_id = plant(spool)
    env = {"RELAYD_SPOOL_PATH": str(spool)}
    code, listed = await relayd(env, "queue", "list", "--json")
    assert code == 0, listed
    code, shown = await relayd(env, "queue", "show", "--json", msg_id)
    assert code == 0, shown
    for out in (listed, shown):
        assert raw_controls(out) == [], out
    (record,) = json.loads(listed)
    assert record["mail_from"] == f"evil{CLEAR}@example.com"
    assert record["recipients"][0]["address"] == f"u{TITLE}@example.org"
    assert json.loads(shown)["last_error"]["text"] == REPLY.removeprefix("451 ")


async def test_health_prints_a_hostile_provider_reply_escaped(tmp_path, pki, hostile):
    """A provider refusing the login with ESC sequences: `relayd health` quotes its reply
    escaped; the daemon's own JSON log lines carry no raw control character either."""
    spool = tmp_path / "spool"
    proc = await ServeProcess(serve_env(spool, hostile.port, pki.ca_file)).start()
    try:
        assert (await submit(proc.port, "app@example.com", ["u@example.org"], message()))[0] == 250

        async def reported() -> str:
            code, out = await relayd({"RELAYD_SPOOL_PATH": str(spool)}, "health")
            return out if code == 0 and "busy" in out else ""

        out = await eventually(reported, what="health quoting the reply")
        assert raw_controls(out) == [], out
        assert SHOWN in out, out
    finally:
        assert await proc.stop() == 0
    assert raw_controls("\n".join(proc.raw)) == []


async def test_check_prints_a_hostile_provider_reply_escaped(tmp_path, pki, hostile):
    """`relayd check`: the refusal's words are shown escaped."""
    env = serve_env(tmp_path / "spool", hostile.port, pki.ca_file)
    code, out = await relayd(env, "check")
    assert code == 1, out
    assert raw_controls(out) == [], out
    assert SHOWN in out, out


async def test_the_console_log_shows_hostile_words_escaped(tmp_path, pki, hostile):
    """log.format console: the provider's refusal (upstream.auth_failed) and a submitter's
    login name (client.auth_failed) are shown escaped."""
    users = tmp_path / "users"
    users.write_text(f"{SUBMITTER}:{auth.hash_password(SUBMITTER_PASSWORD)}\n")
    env = serve_env(tmp_path / "spool", hostile.port, pki.ca_file, listen_users_file=str(users))
    proc = ServeProcess(env)
    proc.env["RELAYD_LOG_FORMAT"] = "console"
    proc.proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relayd",
        "serve",
        env=proc.env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.proc.stderr is not None
    text = ""
    try:
        async with asyncio.timeout(30):
            while not (port := re.search(r"server\.started.* port=(\d+)", text)):
                text += (await proc.proc.stderr.readline()).decode("utf-8", "surrogateescape")
            data = message()
            assert (await submit(int(port[1]), "a@example.com", ["u@example.org"], data))[0] == 250
            wire = await Wire.open(int(port[1]))
            await wire.greet()
            blob = base64.b64encode(f"\0{LOGIN}\0wrong".encode())
            assert (await wire.cmd(b"AUTH PLAIN " + blob))[0] == 535
            wire.close()
            while "upstream.auth_failed" not in text or "client.auth_failed" not in text:
                text += (await proc.proc.stderr.readline()).decode("utf-8", "surrogateescape")
    finally:
        assert await proc.stop() == 0
    failed = [line for line in text.splitlines() if "auth_failed" in line]
    assert raw_controls(text) == [], failed
    assert any(SHOWN in line for line in failed), failed
    assert any("evil\\x1b]0;pwned\\x07" in line for line in failed), failed
