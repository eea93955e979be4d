"""`relayd queue …` as separate processes against a running `relayd serve` and a TLS upstream."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from conftest import Sink, eventually, free_port, message, start_sink, stop_sink, submit
from proc import ServeProcess, serve_env

from relayd.spool import Spool


async def run_cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """Run `relayd ARGS` in a subprocess; returns (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relayd",
        *args,
        env={**os.environ, **env, "COLUMNS": "160"},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def envelopes(spool: Path, state: str = "queue") -> list[dict[str, Any]]:
    if not (spool / state).exists():
        return []
    return [env.to_json() for env in Spool(spool).scan(state)]


def attempted(spool: Path, n: int = 1) -> Any:
    envs = envelopes(spool)
    return envs if envs and all(e["attempts"] >= n for e in envs) else None


async def daemon(spool: Path, port: int, ca: Path, **extra: str) -> ServeProcess:
    # A long initial delay: after one failed attempt only `queue retry` can cause another.
    env = serve_env(spool, port, ca, retry_initial_delay="3600", retry_max_delay="3600", **extra)
    return await ServeProcess(env).start()


async def test_list_and_show_report_attempts_and_the_upstream_reply(tmp_path, pki, sink):
    """After a 451, list (table and --json) and show give the attempt and the server's words."""
    sink.data_replies = ["451 4.3.0 mailbox busy, try later"]
    spool = tmp_path / "spool"
    proc = await daemon(spool, sink.port, pki.ca_file)
    try:
        data = message("stuck")
        await submit(proc.port, "app@example.com", ["u@example.org"], data)
        (env,) = await eventually(lambda: attempted(spool), what="one deferred attempt")
        code, out, _ = await run_cli(proc.env, "queue", "list", "--json")
        assert code == 0
        (row,) = json.loads(out)
        assert row["id"] == env["id"] and row["state"] == "queued" and row["attempts"] == 1
        assert row["last_error"]["code"] == 451 and row["last_error"]["step"] == "data"
        assert "mailbox busy" in row["last_error"]["text"]
        (rcpt,) = row["recipients"]
        assert (rcpt["address"], rcpt["state"], rcpt["code"]) == ("u@example.org", "pending", 451)
        code, out, _ = await run_cli(proc.env, "queue", "list")
        assert code == 0 and "451 4.3.0 mailbox busy" in out and "queued" in out
        assert env["id"].rsplit(".", 1)[1] in out and re.search(r"in (4\d|5\d|6\d|7\d)m ", out)
        code, out, _ = await run_cli(proc.env, "queue", "show", env["id"][-8:])
        assert code == 0 and f"id:        {env['id']}" in out
        assert "#1" in out and "deferred" in out and "data: 451 4.3.0 mailbox busy" in out
        code, out, _ = await run_cli(proc.env, "queue", "show", env["id"], "--raw")
        assert code == 0 and out.encode() == data
    finally:
        await proc.stop()


async def test_retry_all_delivers_soon_after_the_upstream_recovers(tmp_path, pki, sink):
    """With an hour of backoff ahead, `queue retry --all` makes the daemon send within seconds."""
    sink.data_replies = ["451 4.3.0 try later"]
    spool = tmp_path / "spool"
    proc = await daemon(spool, sink.port, pki.ca_file)
    try:
        await submit(proc.port, "app@example.com", ["u@example.org"], message("later"))
        await eventually(lambda: attempted(spool), what="one deferred attempt")
        assert sink.messages == []
        code, out, _ = await run_cli(proc.env, "queue", "retry", "--all")
        assert code == 0 and "retried 1 message" in out and f"pid {proc.proc.pid}" in out
        await eventually(lambda: sink.messages, timeout=5, what="delivery after retry")
        await eventually(lambda: not envelopes(spool), what="queue emptied")
    finally:
        await proc.stop()


async def test_retry_moves_a_failed_message_back_for_its_refused_recipients(tmp_path, pki, sink):
    """A partly refused message in failed/ goes back: only the refused recipient is sent again."""
    sink.rcpt_replies = {"gone@example.org": "550 5.1.1 no such user"}
    spool = tmp_path / "spool"
    proc = await daemon(spool, sink.port, pki.ca_file)
    try:
        rcpts = ["a@example.org", "gone@example.org"]
        await submit(proc.port, "app@example.com", rcpts, message("partial"))
        (env,) = await eventually(lambda: envelopes(spool, "failed"), what="failed/")
        code, out, _ = await run_cli(proc.env, "queue", "list", "--state", "failed", "--json")
        assert json.loads(out)[0]["reason"].startswith("gone@example.org: 550")
        sink.rcpt_replies = {}
        code, _, _ = await run_cli(proc.env, "queue", "retry", env["id"])
        assert code == 0
        await eventually(lambda: len(sink.messages) == 2, timeout=5, what="second delivery")
        assert sink.messages[1].rcpt_tos == ["gone@example.org"]
        await eventually(lambda: not list(spool.glob("*/*.eml")), what="spool emptied")
    finally:
        await proc.stop()


async def test_delete_removes_both_files_and_bulk_needs_yes(tmp_path, pki):
    """delete ID removes the .eml and the .json; --all without --yes deletes nothing."""
    spool = tmp_path / "spool"
    proc = await daemon(spool, free_port(), pki.ca_file)
    try:
        for n in range(2):
            await submit(proc.port, "app@example.com", ["u@example.org"], message(f"m{n}"))
        first, second = await eventually(lambda: attempted(spool), what="attempts")
        code, _, err = await run_cli(proc.env, "queue", "delete", "--all")
        assert code == 1 and "--yes" in err and len(envelopes(spool)) == 2
        code, out, _ = await run_cli(proc.env, "queue", "delete", first["id"])
        assert code == 0 and "deleted 1 message" in out
        assert sorted(p.name for p in (spool / "queue").iterdir()) == [
            f"{second['id']}.eml",
            f"{second['id']}.json",
        ]
        await eventually(lambda: proc.events("queue.rescanned"), what="daemon rescan")
        code, out, _ = await run_cli(proc.env, "queue", "delete", "--all", "--yes")
        assert code == 0 and "deleted 1 message" in out
        assert list((spool / "queue").iterdir()) == []
    finally:
        await proc.stop()


class SlowSink(Sink):
    """An upstream that takes a moment per DATA, so retries land while deliveries run."""

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        await asyncio.sleep(0.05)  # simulated provider latency, not a wait for a condition
        return await super().handle_DATA(server, session, envelope)


async def test_concurrent_retries_during_delivery_send_each_message_once(tmp_path, pki):
    """Two processes running `queue retry --all` while the daemon delivers: one copy each."""
    n = 12
    sink = await start_sink(SlowSink(data_replies=["451 4.3.0 later"] * n), pki.server_ctx)
    spool = tmp_path / "spool"
    proc = await daemon(spool, sink.port, pki.ca_file, upstream_max_connections="2")
    try:
        for i in range(n):
            await submit(proc.port, "app@example.com", ["u@example.org"], message(f"c{i}"))
        await eventually(lambda: len(attempted(spool) or []) == n, what="all deferred once")
        for _ in range(2):  # the second round lands while the first round is being sent
            results = await asyncio.gather(
                *(run_cli(proc.env, "queue", "retry", "--all") for _ in range(2)),
            )
            assert [r[0] for r in results] == [0, 0]
        await eventually(lambda: len(sink.messages) >= n, timeout=15, what="all delivered")
        await eventually(lambda: not list(spool.glob("queue/*")), what="queue emptied")
        more = await run_cli(proc.env, "queue", "retry", "--all")
        assert more[0] == 0 and "retried 0 messages" in more[1]
        subjects = [m.data.split(b"Subject: ")[1].split(b"\r\n")[0] for m in sink.messages]
        assert sorted(subjects) == sorted(f"c{i}".encode() for i in range(n))
        assert list((spool / "corrupt").iterdir()) == []
    finally:
        await proc.stop()
        await stop_sink(sink)


def test_an_operator_edit_holds_off_the_daemons_writes(tmp_path):
    """While a CLI holds the edit lock, another process's save waits, then lands after it."""
    import dataclasses
    import threading

    from relayd.spool import Spool

    cli, daemon_view = Spool(tmp_path), Spool(tmp_path)
    cli.create()
    env = cli.put("a@example.com", ["u@example.org"], b"Subject: x\r\n\r\nx\r\n", 0.0)
    writer = threading.Thread(target=daemon_view.save, args=(dataclasses.replace(env, attempts=5),))
    with cli.editing(exclusive=True):
        writer.start()
        writer.join(0.2)
        assert writer.is_alive(), "the daemon's save did not wait for the operator's edit"
        assert cli.load(env.id).attempts == 0
    writer.join(5)
    assert cli.load(env.id).attempts == 5
