"""The delivery process: supervised by the listener, never outliving it, never a second sender."""

from __future__ import annotations

import os
import signal

from conftest import Sink, eventually, free_port, message, start_sink, stop_sink, submit
from proc import ServeProcess, alive, serve_env


async def test_a_killed_delivery_process_is_replaced_and_mail_flows(tmp_path, pki, sink):
    """kill -9 of the delivery process: the listener starts a new one, delivery goes on."""
    proc = await ServeProcess(serve_env(tmp_path / "spool", sink.port, pki.ca_file)).start()
    try:
        await eventually(lambda: proc.events("worker.started"), what="worker.started")
        first = proc.events("worker.started")[0]["pid"]
        await submit(proc.port, "app@example.com", ["u@example.org"], message("before"))
        await eventually(lambda: len(sink.messages) == 1, what="first delivery")
        os.kill(first, signal.SIGKILL)
        await eventually(lambda: len(proc.events("worker.started")) == 2, what="a new worker")
        assert proc.events("worker.exited")
        code, _ = await submit(proc.port, "app@example.com", ["u@example.org"], message("after"))
        assert code == 250
        # "before" may arrive twice: the kill can fall between the upstream's 250 and the
        # removal from the spool (at-least-once). "after" must arrive.
        await eventually(
            lambda: any(b"Subject: after" in m.data for m in sink.messages),
            what="delivery by the new worker",
        )
    finally:
        assert await proc.stop() == 0


async def test_the_delivery_process_dies_with_its_listener(tmp_path, pki):
    """kill -9 of the listener: its delivery process stops instead of sending on its own."""
    port = free_port()
    env = serve_env(tmp_path / "spool", port, pki.ca_file)
    proc = await ServeProcess(env).start()
    await eventually(lambda: proc.events("worker.started"), what="worker.started")
    worker = proc.events("worker.started")[0]["pid"]
    await submit(proc.port, "app@example.com", ["u@example.org"], message("queued"))
    await proc.kill9()
    await eventually(lambda: not alive(worker), timeout=20, what="the orphaned worker to exit")
    sink = await start_sink(Sink(), pki.server_ctx, port=port)
    try:
        again = await ServeProcess(env).start()
        await eventually(lambda: len(sink.messages) == 1, timeout=20, what="delivery after restart")
        assert await again.stop() == 0
    finally:
        await stop_sink(sink)


async def test_a_stuck_delivery_process_is_replaced(tmp_path, pki, sink):
    """SIGSTOP the delivery process: its reports stop, the listener replaces it, mail flows."""
    env = serve_env(tmp_path / "spool", sink.port, pki.ca_file, relay_hang_timeout="2")
    proc = await ServeProcess(env).start()
    try:
        await eventually(lambda: proc.events("worker.started"), what="worker.started")
        stuck = proc.events("worker.started")[0]["pid"]
        os.kill(stuck, signal.SIGSTOP)
        code, _ = await submit(proc.port, "app@example.com", ["u@example.org"], message("stuck"))
        assert code == 250  # accepting never waits for the delivery process
        await eventually(lambda: proc.events("worker.hung"), timeout=20, what="worker.hung")
        assert proc.events("worker.hung")[0]["pid"] == stuck
        await eventually(
            lambda: any(b"Subject: stuck" in m.data for m in sink.messages),
            timeout=20,
            what="delivery by the replacement",
        )
        assert not alive(stuck)
        assert proc.events("worker.started")[-1]["pid"] != stuck
    finally:
        assert await proc.stop() == 0
