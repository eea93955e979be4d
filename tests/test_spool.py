"""250 means on disk: the reply to DATA waits for the directory fsync; failures are 4xx."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import threading

import pytest
from conftest import free_port, make_config, message, queue_files, running, submit

from relayd.errors import SpoolError
from relayd.spool import Spool


async def test_250_is_sent_only_after_the_directory_fsync(tmp_path, pki, monkeypatch):
    """While the queue directory's fsync has not returned, the client has no reply."""
    cfg = make_config(tmp_path, free_port(), pki.ca_file)
    entered, release = threading.Event(), threading.Event()
    original = Spool._sync_dir

    def held(self: Spool, state: str) -> None:
        if state == "queue":
            entered.set()
            release.wait(10)
        original(self, state)

    monkeypatch.setattr(Spool, "_sync_dir", held)
    async with running(cfg) as d:
        reply = asyncio.create_task(
            submit(d.address[1], "app@example.com", ["u@example.org"], message())
        )
        assert await asyncio.to_thread(entered.wait, 10)
        assert not reply.done(), "a reply went out before the directory fsync"
        release.set()
        code, _ = await reply
    assert code == 250


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO, errno.EROFS])
async def test_failing_spool_write_answers_4xx_and_keeps_nothing(tmp_path, pki, monkeypatch, err):
    """fsync failing (disk full, I/O error, read-only): 4xx, empty queue, empty tmp/."""
    cfg = make_config(tmp_path, free_port(), pki.ca_file)
    real_fsync = os.fsync

    def failing(fd: int) -> None:
        raise OSError(err, os.strerror(err))

    async with running(cfg) as d:
        monkeypatch.setattr(os, "fsync", failing)
        code, text = await submit(d.address[1], "app@example.com", ["u@example.org"], message())
        monkeypatch.setattr(os, "fsync", real_fsync)
        assert 400 <= code < 500, (code, text)
        assert queue_files(cfg) == [] and queue_files(cfg, "tmp") == []
        # Space is back: the same daemon accepts again without a restart.
        code, _ = await submit(d.address[1], "app@example.com", ["u@example.org"], message())
        assert code == 250


def test_ids_sort_by_arrival_and_are_unique(tmp_path):
    """Ids from one process are strictly increasing; two spools never collide."""
    a, b = Spool(tmp_path / "s"), Spool(tmp_path / "s")
    ids = [a.new_id() for _ in range(2000)] + [b.new_id() for _ in range(10)]
    assert ids[:2000] == sorted(ids[:2000])
    assert len(set(ids)) == len(ids)


def test_put_writes_one_private_file_whose_first_line_is_the_envelope(tmp_path):
    """put() leaves one <id>.eml, 0600 in 0700 directories: envelope line, then the message."""
    spool = Spool(tmp_path / "s")
    spool.create()
    data = b"Subject: x\r\n\r\nbody\r\n"
    env = spool.put("a@example.com", ["b@example.org", "\u00e9@example.org"], data, 1e9)
    q = tmp_path / "s" / "queue"
    assert [p.name for p in q.iterdir()] == [f"{env.id}.eml"]
    first, rest = (q / f"{env.id}.eml").read_bytes().split(b"\r\n", 1)
    assert first.startswith(b"X-Relayd-Envelope: {") and first.isascii()
    assert rest == data
    assert (q / f"{env.id}.eml").stat().st_mode & 0o777 == 0o600
    for d in ("", "queue", "failed", "tmp"):
        assert (tmp_path / "s" / d).stat().st_mode & 0o777 == 0o700
    assert spool.load(env.id) == env
    assert list(spool.scan("queue", repair=True)) == [env]
    assert spool.read(env) == data
    assert spool.load_message(env.id) == (env, data)


def test_a_saved_envelope_wins_over_the_line_and_the_message_stays_exact(tmp_path):
    """After save() the .json carries the state; the body read back is still byte-exact."""
    spool = Spool(tmp_path / "s")
    spool.create()
    data = b"X-Relayd-Envelope: a client's own header\r\n\r\n" + b"x" * 200_000 + b"\r\n"
    env = spool.put("a@x", ["b@y"], data, 1e9)
    later = dataclasses.replace(env, attempts=3, next_attempt_at=2e9)
    spool.save(later)
    assert spool.load(env.id) == later
    assert spool.load_message(env.id) == (later, data)
    assert [e.attempts for e in spool.scan("queue", repair=True)] == [3]
    spool.remove(env.id)
    assert list((tmp_path / "s" / "queue").iterdir()) == []


def test_an_envelope_line_longer_than_one_read_is_read_whole(tmp_path):
    """A recipient list far past the first 64 KiB read still parses; the body stays exact."""
    spool = Spool(tmp_path / "s")
    spool.create()
    rcpts = [f"user{i:05d}-{'x' * 40}@example.org" for i in range(2000)]  # ~130 KiB of JSON
    data = b"Subject: many\r\n\r\n" + b"y" * 100_000 + b"\r\n"
    env = spool.put("a@x", rcpts, data, 1e9)
    assert [r.address for r in spool.load(env.id).rcpt_to] == rcpts
    assert spool.load_message(env.id) == (env, data)


def test_scan_quarantines_damage_and_keeps_the_rest(tmp_path):
    """Truncated json, orphans and garbage go to corrupt/; good messages are still listed."""
    spool = Spool(tmp_path / "s")
    spool.create()
    good = spool.put("a@x", ["b@y"], b"ok\r\n", 1e9)
    bad = spool.put("a@x", ["b@y"], b"bad\r\n", 1e9)
    q = tmp_path / "s" / "queue"
    (q / f"{bad.id}.json").write_text('{"id": "trunc')
    (q / "orphan.eml").write_bytes(b"x")
    (q / "broken.eml").write_bytes(b'X-Relayd-Envelope: {"id": "tru\r\n\r\nx\r\n')
    (q / "lonely.json").write_text("{}")
    (q / "garbage.txt").write_text("?")
    found = [e.id for e in spool.scan("queue", repair=True)]
    assert found == [good.id]
    corrupt = sorted(p.name for p in (tmp_path / "s" / "corrupt").iterdir())
    damaged = [f"{bad.id}.json", f"{bad.id}.eml", "orphan.eml", "broken.eml", "lonely.json"]
    assert corrupt == sorted([*damaged, "garbage.txt"])


def test_lock_refuses_a_second_daemon(tmp_path):
    """Two daemons on one spool would send twice: the second is refused."""
    a, b = Spool(tmp_path / "s"), Spool(tmp_path / "s")
    a.create()
    a.lock()
    with pytest.raises(SpoolError, match="another relayd"):
        b.lock()
    assert b.daemon_pid() == os.getpid()
    a.unlock()
    assert b.daemon_pid() is None


def test_move_of_a_deleted_message_leaves_nothing_behind(tmp_path):
    """An operator deleted the message mid-attempt: move() raises, failed/ stays empty."""
    spool = Spool(tmp_path / "s")
    spool.create()
    env = spool.put("a@x", ["b@y"], b"x\r\n", 1e9)
    spool.remove(env.id)
    with pytest.raises(SpoolError, match="no such message"):
        spool.move(env, "failed")
    assert list((tmp_path / "s" / "failed").iterdir()) == []
    assert list((tmp_path / "s" / "tmp").iterdir()) == []
