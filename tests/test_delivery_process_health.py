"""A dead delivery process never looks healthy; the pipe to it survives any report line; and a
message the index missed is found by the periodic safety rescan."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import urllib.error
import urllib.request
from typing import Any

from aiosmtpd.smtp import AuthResult
from conftest import Sink, eventually, free_port, message, start_sink, stop_sink, submit
from proc import ServeProcess, run_cli, serve_env

from relayd import config as config_mod
from relayd import supervisor, wire
from relayd.spool import Spool


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class Notify:
    """systemd's end of sd_notify(3): what the daemon sent."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except BlockingIOError:
                return self.messages


async def test_a_crash_looping_delivery_process_turns_health_red_with_the_reason(tmp_path, pki):
    """The delivery process dies at every start: after relay.hang_timeout `relayd health`,
    /healthz and STATUS= all say so, with the reason; green again once it starts."""
    spool = tmp_path / "spool"
    Spool(spool).create()
    (spool / "relay.lock").mkdir()  # the delivery process cannot open its lock: it exits
    notify = Notify(str(tmp_path / "notify.sock"))
    metrics_port = free_port()
    env = serve_env(
        spool,
        free_port(),
        pki.ca_file,
        relay_hang_timeout="2",
        metrics_listen=f"127.0.0.1:{metrics_port}",
    )
    env.update(
        NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC="1000000", WATCHDOG_PID=""
    )
    proc = await ServeProcess(env).start()
    try:

        async def red() -> str:
            notify.drain()
            code, out, _ = await run_cli({"RELAYD_SPOOL_PATH": str(spool)}, "health")
            return out if code == 1 else ""

        out = await eventually(red, timeout=20, what="`relayd health` to turn red")
        assert "delivery process" in out and "exit" in out, out
        code, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{metrics_port}/healthz")
        assert code == 503 and "delivery process" in body, body
        await eventually(
            lambda: any("delivery process" in m for m in notify.drain() if "STATUS=" in m),
            what="STATUS= naming the delivery process",
        )
        assert proc.events("worker.exited")
        (spool / "relay.lock").rmdir()

        async def green() -> bool:
            notify.drain()
            code, _, _ = await run_cli({"RELAYD_SPOOL_PATH": str(spool)}, "health")
            return code == 0

        await eventually(green, timeout=20, what="health to turn green again")
        code, _ = await asyncio.to_thread(_get, f"http://127.0.0.1:{metrics_port}/healthz")
        assert code == 200
    finally:
        assert await proc.stop() == 0
        notify.sock.close()


class HugeAuthReply(Sink):
    """An upstream whose 535 is as long as a client accepts, in bytes that JSON inflates 6x."""

    def authenticate(self, *args: Any) -> AuthResult:
        lines = ["535-" + "\x01" * 7000] * 4 + ["535 5.7.8 credentials invalid"]
        return AuthResult(success=False, handled=False, message="\r\n".join(lines))


async def test_a_huge_provider_reply_does_not_break_the_pipe(tmp_path, pki):
    """A 28 KiB reply (170 KiB as JSON) at every attempt: the delivery process's reports keep
    arriving (status.json counts the failures), and it is never taken for hung and killed."""
    sink = await start_sink(HugeAuthReply(), pki.server_ctx)
    spool = tmp_path / "spool"
    env = serve_env(spool, sink.port, pki.ca_file, relay_hang_timeout="3")
    proc = await ServeProcess(env).start()
    try:
        code, _ = await submit(proc.port, "app@example.com", ["u@example.org"], message("big"))
        assert code == 250

        def failures() -> int:
            doc = json.loads((spool / "status.json").read_text())
            return int(doc.get("consecutive_failures") or 0)

        await eventually(
            lambda: failures() >= 3 or proc.events("worker.hung"),
            timeout=20,
            what="three failures reported (or a hang)",
        )
        assert not proc.events("worker.hung")
        assert failures() >= 3
        assert len(proc.events("worker.started")) == 1
        text = json.loads((spool / "status.json").read_text())["last_error"]["text"]
        assert 0 < len(text) <= 1000  # what health prints stays one readable line
    finally:
        assert await proc.stop() == 0
        await stop_sink(sink)


async def test_a_message_the_index_missed_is_found_by_the_safety_rescan(tmp_path, pki, sink):
    """A message written into queue/ behind the daemon's back (no signal) is delivered after
    relay.rescan_interval."""
    spool = tmp_path / "spool"
    env = serve_env(spool, sink.port, pki.ca_file, relay_rescan_interval="1")
    proc = await ServeProcess(env).start()
    try:
        Spool(spool).put("app@example.com", ["u@example.org"], message("missed"), time.time())
        await eventually(lambda: sink.messages, timeout=15, what="delivery after a rescan")
    finally:
        assert await proc.stop() == 0


async def test_the_report_reader_survives_an_over_long_and_a_malformed_line(tmp_path):
    """Through a real pipe: a line past the reader's limit, lines that are not reports, then a
    good report: the reader is still running and the good report is applied."""
    cfg = config_mod.load(None, {"RELAYD_SPOOL_PATH": str(tmp_path / "spool")})
    watcher = supervisor.DeliveryProcess(cfg, dev=True)
    read_fd, write_fd = os.pipe()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=supervisor.LINE_LIMIT)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", 0)
    )
    task = asyncio.create_task(watcher._read(reader))
    good = wire.Report(wire.DeliveryStatus(queued=7, consecutive_failures=2))
    lines = [
        b'{"status": {"last_error": "' + b"x" * (3 * supervisor.LINE_LIMIT) + b'"}}\n',
        b"not json\n",
        b"[1, 2]\n",
        b'{"ready": "many"}\n',
        b'{"status": {"queued": "seven"}}\n',
        wire.encode(good),
    ]
    try:
        for line in lines:
            await asyncio.to_thread(os.write, write_fd, line)
        await eventually(lambda: watcher.status.queued == 7, what="the good report")
        assert not task.done()
        assert watcher.status.consecutive_failures == 2
    finally:
        os.close(write_fd)
        await asyncio.wait_for(task, 5)  # end of output ends the reader, and only that
        transport.close()
