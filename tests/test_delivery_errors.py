"""Any exception during a delivery is a recorded attempt: attempts counts it, last_error says
why, the next try follows the backoff, and `relayd queue list` shows it all.

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
async def test_an_exception_in_a_delivery_is_a_recorded_backed_off_attempt(
    tmp_path, pki, sink, mail_from, rcpt
):
    """An address the client library refuses: attempts rises, last_error has the reason,
    the retries back off; never a silent loop with attempts stuck at 0."""
    spool_dir = tmp_path / "spool"
    spool = Spool(spool_dir)
    spool.create()
    spool.put(mail_from, [rcpt], message("bad"), time.time())
    env = serve_env(spool_dir, sink.port, pki.ca_file)
    proc = await ServeProcess(env).start()
    try:

        async def tried_thrice() -> dict | None:
            rows = await queue_list(spool_dir)
            return rows[0] if rows and rows[0]["attempts"] >= 3 else None

        row = await eventually(tried_thrice, timeout=20, what="three recorded attempts")
        assert row["last_error"]["step"] and row["last_error"]["text"], row
        deferred = [e for e in proc.events("delivery.deferred") if e["attempt"] <= 3]
        waits = [e["retry_in"] for e in deferred]
        assert len(waits) == 3 and waits[2] > waits[0], waits  # 0.05 s doubling, jittered
        assert sink.messages == []
        code, out, _ = await run_cli({"RELAYD_SPOOL_PATH": str(spool_dir)}, "queue", "list")
        assert code == 0 and row["last_error"]["step"] in out
    finally:
        assert await proc.stop() == 0
