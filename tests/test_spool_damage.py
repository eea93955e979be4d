"""A damaged spool and a full disk: relayd quarantines or reports, keeps serving, and delivers
everything else; a full filesystem means 4xx, never 250, and recovery needs no restart."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import eventually, make_config, message, queue_files, running, submit
from faults import FaultServer
from structlog.testing import capture_logs

from relayd.spool import Spool


@pytest.fixture
async def upstream(pki):
    async with FaultServer(pki) as fs:
        yield fs


def seed(spool_dir: Path) -> tuple[Spool, list[str]]:
    """Two good messages and one of each kind of damage; returns the good subjects."""
    spool = Spool(spool_dir)
    spool.create()
    good = ["good-1", "good-2"]
    for subject in good:
        spool.put("app@example.com", ["u@example.org"], message(subject), time.time())
    truncated = spool.put("app@example.com", ["u@example.org"], message("trunc"), time.time())
    q = spool_dir / "queue"
    (q / f"{truncated.id}.json").write_text('{"id": "trun')
    (q / "20260101T000000.000000Z.0000aaaa.eml").write_bytes(message("orphan-eml"))
    (q / "20260101T000000.000001Z.0000bbbb.json").write_text("{}")
    (q / "core.12345").write_bytes(b"\x7fELF garbage")
    return spool, good


async def test_damage_at_start_up_is_quarantined_and_the_rest_delivered(tmp_path, pki, upstream):
    """Truncated json, lone eml, lone json, garbage: corrupt/ with a log line each; good sent."""
    cfg = make_config(tmp_path, upstream.port, pki.ca_file)
    _, good = seed(Path(cfg.spool.path))
    with capture_logs() as logs:
        async with running(cfg) as d:
            await eventually(lambda: len(upstream.messages) == 2, what="the good two")
            code, _ = await submit(d.address[1], "app@example.com", ["u@example.org"], message())
            assert code == 250
            await eventually(lambda: len(upstream.messages) == 3, what="a new message too")
    subjects = sorted(m.decode() for m in upstream.received(b"Subject"))
    assert subjects == sorted([*good, "hello"])
    corrupt = sorted(p.name for p in (Path(cfg.spool.path) / "corrupt").iterdir())
    assert len(corrupt) == 5 and "core.12345" in corrupt
    quarantined = [e for e in logs if e["event"] == "spool.quarantined"]
    assert len(quarantined) == 5 and all(e["reason"] for e in quarantined)


async def test_damage_while_running_is_quarantined_on_rescan(tmp_path, pki, upstream):
    """Garbage dropped into queue/ of a running daemon: a rescan moves it aside, serving goes on."""
    cfg = make_config(tmp_path, upstream.port, pki.ca_file)
    async with running(cfg) as d:
        q = Path(cfg.spool.path) / "queue"
        (q / "20260101T000000.000002Z.0000cccc.json").write_text('{"id": ')
        (q / "notes.txt").write_text("operator was here")
        await d.rescan()
        code, _ = await submit(d.address[1], "app@example.com", ["u@example.org"], message())
        assert code == 250
        await eventually(lambda: upstream.messages, what="delivery after the rescan")
    assert queue_files(cfg) == []
    assert sorted(p.name for p in (Path(cfg.spool.path) / "corrupt").iterdir()) == [
        "20260101T000000.000002Z.0000cccc.json",
        "notes.txt",
    ]


async def test_wrong_mode_and_owner_are_reported_and_mail_still_goes(tmp_path, pki, upstream):
    """A 0644 .eml and .json are tightened to 0600, a foreign owner is logged; both go."""
    cfg = make_config(tmp_path, upstream.port, pki.ca_file)
    spool = Spool(cfg.spool.path)
    spool.create()
    wide = spool.put("app@example.com", ["u@example.org"], message("wide"), time.time())
    foreign = spool.put("app@example.com", ["u@example.org"], message("foreign"), time.time())
    spool.save(wide)  # as after an attempt: the message has a .json too
    for ext in ("eml", "json"):
        os.chmod(spool.path("queue", wide.id, ext), 0o644)
    chowned = os.geteuid() == 0
    if chowned:
        os.chown(spool.path("queue", foreign.id, "eml"), 65534, 65534)
    with capture_logs() as logs:
        async with running(cfg):
            await eventually(lambda: len(upstream.messages) == 2, what="both delivered")
    fixed = [e for e in logs if e["event"] == "spool.mode_fixed"]
    assert len(fixed) == 2 and all(e["was"] == "0o644" for e in fixed)
    if chowned:
        owners = [e for e in logs if e["event"] == "spool.wrong_owner"]
        assert owners and owners[0]["uid"] == 65534


@pytest.fixture
def tiny_fs(tmp_path):
    """A 2 MiB tmpfs (needs root and mount permission; skipped otherwise)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mnt)],
            check=True,
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        pytest.skip("cannot mount a tmpfs here (not root, or no mount permission)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=10)


def fill(path: Path) -> Path:
    """Write until the filesystem says ENOSPC; returns the filler file."""
    filler = path / "filler"
    fh = open(filler, "wb")  # noqa: SIM115 - closing may itself hit ENOSPC
    with contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 65536)
            fh.flush()
    with contextlib.suppress(OSError):
        fh.close()
    with contextlib.suppress(OSError):
        with open(path / "probe", "wb") as fh:
            fh.write(b"\0" * 65536)
            fh.flush()
            os.fsync(fh.fileno())
        pytest.fail("the filesystem is not full")
    return filler


async def test_a_really_full_disk_gets_4xx_then_recovers_without_restart(
    tmp_path, pki, upstream, tiny_fs
):
    """On a full tmpfs: 452, nothing half-written; space back: 250 and delivery, same daemon."""
    cfg = make_config(tmp_path, upstream.port, pki.ca_file, spool_path=str(tiny_fs / "spool"))
    async with running(cfg) as d:
        port = d.address[1]
        upstream.fail("data_451")  # keep what gets in queued, so the disk stays full
        filler = fill(tiny_fs)
        big = message(body=("x" * 76 + "\r\n") * 2000)
        code, text = await submit(port, "app@example.com", ["u@example.org"], big)
        assert 400 <= code < 500, (code, text)
        assert code == 452 and "4.3.1" in text
        assert queue_files(cfg) == [] and queue_files(cfg, "tmp") == []
        filler.unlink()
        upstream.faults.clear()
        code, _ = await submit(port, "app@example.com", ["u@example.org"], big)
        assert code == 250
        await eventually(lambda: upstream.messages, what="delivery once space is back")
