"""What the spool holds but SMTP cannot carry is a recorded outcome: attempts counts it,
last_error says why, and `relayd queue list` shows it all.

The messages are written straight into the spool, as an older relayd or a maildrop could have
left them: the listener refuses such addresses at MAIL/RCPT, but the delivery side must cope
with whatever the spool holds.
"""

from __future__ import annotations

import json
import time

import pytest
from conftest import eventually, message
from proc import ServeProcess, run_cli, serve_env

from relayd.spool import Spool


async def queue_list(spool) -> list[dict]:
    code, out, err = await run_cli({"RELAYD_SPOOL_PATH": str(spool)}, "queue", "list", "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize(
    ("mail_from", "rcpt"),
    [
        ("app@example.com", "bad\x01name@example.org"),  # the client library's ValueError
        ("app@example.com", "caf\udce9@example.org"),  # invalid UTF-8 kept by surrogateescape
        ("ev\ril@example.com", "u@example.org"),  # a CR in the sender
    ],
    ids=["control-character", "surrogate-escaped", "cr-in-sender"],
)
async def test_an_address_smtp_cannot_carry_is_a_recorded_refusal(
    tmp_path, pki, sink, mail_from, rcpt
):
    """An address no SMTP command can carry (it would raise in any client library): one
    recorded attempt that fails it with the reason, shown by `relayd queue list`; never a
    silent loop with attempts stuck at 0, and nothing of it reaches the upstream."""
    spool_dir = tmp_path / "spool"
    spool = Spool(spool_dir)
    spool.create()
    spool.put(mail_from, [rcpt], message("bad"), time.time())
    env = serve_env(spool_dir, sink.port, pki.ca_file)
    proc = await ServeProcess(env).start()
    try:
        await eventually(lambda: proc.events("delivery.failed"), timeout=20, what="refusal")
        code, out, err = await run_cli(
            {"RELAYD_SPOOL_PATH": str(spool_dir)}, "queue", "list", "--json", "--state", "failed"
        )
        assert code == 0, err
        row = json.loads(out)[0]
        assert row["attempts"] == 1, row
        assert "cannot be sent in SMTP" in row["last_error"]["text"], row
        assert sink.messages == [] and sink.mail_commands == 0
        code, out, _ = await run_cli(
            {"RELAYD_SPOOL_PATH": str(spool_dir)}, "queue", "list", "--state", "failed"
        )
        assert code == 0 and "an address" in out and "None" not in out
    finally:
        assert await proc.stop() == 0
