"""A spool that stops taking writes after the provider's 250: the message is never sent again
by the same daemon, only the bookkeeping is retried, and `relayd health` says why.

The faults are real: a read-only bind mount over the spool, an immutable (`chattr +i`) file
that even root cannot remove, a full tmpfs. Each needs root; each test skips without it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Sink, eventually, message, start_sink, stop_sink, submit
from proc import ServeProcess, run_cli, serve_env

from relayd.errors import SpoolError
from relayd.spool import Spool


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=10)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """path becomes a read-only mount of itself until the block ends (skips if not allowed)."""
    try:
        _run("mount", "--bind", str(path), str(path))
    except (OSError, subprocess.SubprocessError):
        pytest.skip("cannot bind-mount here (not root, or no mount permission)")
    try:
        _run("mount", "-o", "remount,bind,ro", str(path))
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=10)


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    """path cannot be changed or removed, by root either, until the block ends."""
    try:
        _run("chattr", "+i", str(path))
    except (OSError, subprocess.SubprocessError):
        pytest.skip("chattr +i is not available on this filesystem")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=False, timeout=10)


class FaultAfterData(Sink):
    """An upstream that records the message, runs `fault` once, then answers 250."""

    def __init__(self, fault: Callable[[], None]) -> None:
        super().__init__()
        self.fault: Callable[[], None] | None = fault

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = await super().handle_DATA(server, session, envelope)
        fault, self.fault = self.fault, None
        if fault is not None:
            fault()
        return reply


def copies(sink: Sink, subject: bytes) -> int:
    return sum(b"Subject: " + subject + b"\r\n" in m.data for m in sink.messages)


def unrecorded(proc: ServeProcess) -> list[dict[str, Any]]:
    return proc.events("delivery.unrecorded")


async def test_a_read_only_spool_after_the_250_never_sends_the_message_again(tmp_path, pki):
    """Spool remounted read-only as the upstream says 250: one copy over many retry intervals,
    the bookkeeping retried with backoff at error level, and done once the spool is writable."""
    spool = tmp_path / "spool"
    stack = contextlib.ExitStack()
    sink = await start_sink(
        FaultAfterData(lambda: stack.enter_context(read_only(spool))), pki.server_ctx
    )
    proc = await ServeProcess(serve_env(spool, sink.port, pki.ca_file)).start()
    try:
        with stack:
            code, _ = await submit(proc.port, "app@example.com", ["u@example.org"], message("ro"))
            assert code == 250
            # 0.05 s initial delay: ten failed bookkeeping rounds span dozens of retry intervals.
            await eventually(
                lambda: len(unrecorded(proc)) >= 4 or copies(sink, b"ro") > 1,
                timeout=20,
                what="bookkeeping retries (or a second copy)",
            )
            assert copies(sink, b"ro") == 1, f"sent {copies(sink, b'ro')} times"
            failures = unrecorded(proc)
            assert all(e["level"] == "error" and e["errno"] == "EROFS" for e in failures)
            waits = [e["retry_in"] for e in failures]
            assert waits[-1] > waits[0]  # backoff, not a fixed delay
        await eventually(
            lambda: not list((spool / "queue").iterdir()), timeout=20, what="the removal"
        )
        await eventually(lambda: proc.events("delivery.recorded"), what="delivery.recorded")
        assert copies(sink, b"ro") == 1
    finally:
        assert await proc.stop() == 0
        await stop_sink(sink)


async def test_an_undeletable_message_file_makes_health_say_the_spool_is_not_writable(
    tmp_path, pki
):
    """An immutable .eml the daemon cannot remove after the 250: `relayd health` exits 1 and
    names the spool write that fails; one copy only; healthy again once it can be removed."""
    spool = tmp_path / "spool"
    stack = contextlib.ExitStack()

    def lock_the_message() -> None:
        (eml,) = (spool / "queue").glob("*.eml")
        stack.enter_context(immutable(eml))

    sink = await start_sink(FaultAfterData(lock_the_message), pki.server_ctx)
    env = serve_env(spool, sink.port, pki.ca_file)
    proc = await ServeProcess(env).start()
    try:
        with stack:
            code, _ = await submit(proc.port, "app@example.com", ["u@example.org"], message("imm"))
            assert code == 250
            await eventually(
                lambda: unrecorded(proc) or copies(sink, b"imm") > 1,
                timeout=20,
                what="delivery.unrecorded (or a second copy)",
            )
            assert copies(sink, b"imm") == 1, f"sent {copies(sink, b'imm')} times"

            async def unhealthy() -> str:
                code, out, _ = await run_cli({"RELAYD_SPOOL_PATH": str(spool)}, "health")
                return out if code == 1 else ""

            out = await eventually(unhealthy, timeout=20, what="health to turn red")
            assert "not writable" in out and "Operation not permitted" in out, out
            assert out.count("\n") == 1
            assert copies(sink, b"imm") == 1
        await eventually(lambda: not list((spool / "queue").iterdir()), timeout=20, what="removal")

        async def healthy() -> bool:
            code, _, _ = await run_cli({"RELAYD_SPOOL_PATH": str(spool)}, "health")
            return code == 0

        await eventually(healthy, timeout=20, what="health to turn green")
        assert copies(sink, b"imm") == 1
    finally:
        assert await proc.stop() == 0
        await stop_sink(sink)


async def test_a_read_only_spool_makes_health_say_not_writable(tmp_path, pki, sink):
    """The spool remounted read-only under a running daemon: `relayd health` exits 1 with
    "not writable" and the OS's reason, in one line."""
    spool = tmp_path / "spool"
    proc = await ServeProcess(serve_env(spool, sink.port, pki.ca_file)).start()
    try:
        with read_only(spool):
            code, out, _ = await run_cli({"RELAYD_SPOOL_PATH": str(spool)}, "health")
        assert code == 1
        assert "not writable" in out and "Read-only file system" in out, out
        assert out.count("\n") == 1
    finally:
        assert await proc.stop() == 0


@pytest.fixture
def tiny_fs(tmp_path):
    """A 2 MiB tmpfs (needs root and mount permission; skipped otherwise)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    try:
        _run("mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mnt))
    except (OSError, subprocess.SubprocessError):
        pytest.skip("cannot mount a tmpfs here (not root, or no mount permission)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=10)


def fill(path: Path) -> Path:
    """Write until the filesystem says ENOSPC; returns the filler file."""
    filler = path / "filler"
    with contextlib.suppress(OSError), open(filler, "wb") as fh:
        while True:
            fh.write(b"\0" * 65536)
            fh.flush()
    return filler


async def test_a_full_disk_after_a_partial_delivery_never_resends_to_the_delivered(
    tmp_path, pki, tiny_fs
):
    """One recipient 250, one 451, then the disk is full so the new state cannot be saved:
    the delivered recipient gets one copy; the other is delivered once space is back."""
    spool = tiny_fs / "spool"
    filled: list[Path] = []
    sink = await start_sink(FaultAfterData(lambda: filled.append(fill(tiny_fs))), pki.server_ctx)
    sink.rcpt_replies["later@example.org"] = "451 4.2.0 try later"
    proc = await ServeProcess(serve_env(spool, sink.port, pki.ca_file)).start()
    try:
        rcpts = ["now@example.org", "later@example.org"]
        code, _ = await submit(proc.port, "app@example.com", rcpts, message("part"))
        assert code == 250
        await eventually(
            lambda: len(unrecorded(proc)) >= 3 or len(sink.messages) > 1,
            timeout=20,
            what="bookkeeping retries (or a second copy)",
        )
        assert [m.rcpt_tos for m in sink.messages] == [["now@example.org"]]
        assert unrecorded(proc)[0]["errno"] == "ENOSPC"
        filled[0].unlink()
        del sink.rcpt_replies["later@example.org"]
        await eventually(lambda: len(sink.messages) == 2, timeout=20, what="the other recipient")
        assert [m.rcpt_tos for m in sink.messages] == [["now@example.org"], ["later@example.org"]]
    finally:
        assert await proc.stop() == 0
        await stop_sink(sink)


def _operations(spool: Spool, queued: str, failed: str) -> dict[str, Callable[[], Any]]:
    env = spool.load(queued)
    now = time.time()
    return {
        "put": lambda: spool.put("a@example.com", ["b@example.org"], message(), now),
        "save": lambda: spool.save(env),
        "remove": lambda: spool.remove(queued),
        "move": lambda: spool.move(env, "failed"),
        "retry": lambda: spool.retry(failed, now, 3600.0),
        "delete": lambda: spool.delete(queued),
        "sweep_tmp": spool.sweep_tmp,
        "lock": spool.lock,
    }


@pytest.mark.parametrize(
    "operation",
    ["put", "save", "remove", "move", "retry", "delete", "sweep_tmp", "lock"],
)
def test_every_spool_write_raises_spool_error_with_the_errno(tmp_path, operation):
    """On a read-only spool each write raises SpoolError carrying errno EROFS, nothing else."""
    spool = Spool(tmp_path / "spool")
    spool.create()
    queued = spool.put("a@example.com", ["b@example.org"], message("q"), time.time()).id
    failed = spool.put("a@example.com", ["b@example.org"], message("f"), time.time())
    spool.move(failed, "failed")
    (spool.root / "tmp" / "left.tmp").write_bytes(b"debris")
    (spool.root / "relayd.lock").unlink(missing_ok=True)
    ops = _operations(spool, queued, failed.id)
    with read_only(spool.root), pytest.raises(SpoolError) as caught:
        ops[operation]()
    assert caught.value.errno == errno.EROFS, caught.value
    assert "Read-only file system" in str(caught.value)


def test_status_json_names_the_field_health_reads(tmp_path):
    """The status file's spool_error field, as written by the daemon, turns health red."""
    from relayd.cli import health

    spool = Spool(tmp_path / "spool")
    spool.create()
    spool.lock()
    try:
        doc = {
            "pid": os.getpid(),
            "updated_at": time.time(),
            "queued": 1,
            "spool_error": {"op": "remove", "errno": "EPERM", "text": "cannot remove X"},
        }
        (spool.root / health.STATUS_FILE).write_text(json.dumps(doc))
        ok, line = health.check(spool.root)
    finally:
        spool.unlock()
    assert not ok
    assert "not writable" in line and "cannot remove X" in line
