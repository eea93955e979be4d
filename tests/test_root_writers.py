"""Writers run as root against a spool another user owns (`sudo relayd queue retry`, the
sendmail maildrop): they write files the spool's owner owns, so the daemon delivers them; and a
file the daemon cannot read is an error to fix, never corruption.

The daemon runs as nobody (uid 65534) here, the CLI as root; skipped when not root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import eventually, free_port, message
from proc import ServeProcess, run_cli, serve_env

from relayd.spool import Spool

OWNER = 65534  # nobody
AS_OWNER = ["setpriv", f"--reuid={OWNER}", f"--regid={OWNER}", "--clear-groups"]

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv"
)


@pytest.fixture
def home(pki) -> Iterator[Path]:
    """A directory nobody can reach (pytest's tmp_path is root's 0700), with the test CA."""
    path = Path(tempfile.mkdtemp(prefix="relayd-owner-"))
    try:
        os.chmod(path, 0o755)
        shutil.copy(pki.ca_file, path / "ca.pem")
        os.chmod(path / "ca.pem", 0o644)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def owned_spool(home: Path) -> Spool:
    spool = Spool(home / "spool")
    spool.create()
    return spool


def chown_tree(root: Path, uid: int = OWNER) -> None:
    for path in [root, *root.rglob("*")]:
        os.lchown(path, uid, uid)


def owners(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.lstat().st_uid for p in [root, *root.rglob("*")]}


def _owner_python() -> tuple[str, dict[str, str]]:
    """A Python the owner can run with relayd importable (a venv under /root is not)."""
    repo = str(Path(__file__).resolve().parent.parent)
    paths = {"PYTHONPATH": os.pathsep.join([sysconfig.get_paths()["purelib"], repo])}
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    dirs = [*os.get_exec_path(), "/usr/local/bin", "/usr/bin"]
    others = [
        (os.path.join(d, version), paths) for d in dirs if os.path.isfile(os.path.join(d, version))
    ]
    for python, extra in [(sys.executable, {}), *others]:
        # The daemon starts its delivery process as sys.executable: that must work too.
        code = (
            "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import relayd'],"
            " check=True, timeout=30, stdin=subprocess.DEVNULL)"
        )
        probe = [*AS_OWNER, python, "-c", "import relayd, aiosmtpd; " + code]
        env = {**os.environ, **extra}
        if subprocess.run(probe, env=env, capture_output=True, cwd="/").returncode == 0:
            return python, extra
    pytest.skip("no Python that nobody can run with relayd importable")


def env_for(home: Path, upstream_port: int) -> dict[str, str]:
    return serve_env(home / "spool", upstream_port, home / "ca.pem")


async def serve_as_owner(env: dict[str, str]) -> ServeProcess:
    python, extra = _owner_python()
    return await ServeProcess({**env, **extra}, prefix=AS_OWNER, python=python).start()


def corrupt(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "spool" / "corrupt").iterdir())


async def test_root_queue_retry_writes_files_the_spool_owner_owns(home, sink):
    """`relayd queue retry` as root on a nobody-owned spool: every file it writes is nobody's,
    and the daemon (as nobody) then delivers the message; nothing lands in corrupt/."""
    spool = owned_spool(home)
    env = spool.put("app@example.com", ["u@example.org"], message("retried"), time.time())
    spool.move(env, "failed")
    (spool.root / "edit.lock").unlink(missing_ok=True)
    chown_tree(spool.root)
    code, out, err = await run_cli(env_for(home, sink.port), "queue", "retry", env.id)
    assert code == 0, out + err
    wrong = {path: uid for path, uid in owners(spool.root).items() if uid != OWNER}
    assert wrong == {}, f"root-owned files in the spool: {wrong}"
    proc = await serve_as_owner(env_for(home, sink.port))
    try:
        await eventually(lambda: sink.messages, timeout=20, what="delivery of the retried message")
    finally:
        assert await proc.stop() == 0
    assert corrupt(home) == []


async def test_root_sendmail_maildrop_writes_a_message_the_daemon_can_send(home, sink):
    """relayd-sendmail as root with no listener: the maildropped files are nobody's and the
    daemon (as nobody) delivers the message; nothing lands in corrupt/."""
    spool = owned_spool(home)
    chown_tree(spool.root)
    env = {**env_for(home, sink.port), "RELAYD_LISTEN_PORT": str(free_port())}  # nobody listens
    code, out, err = await run_cli(env, "sendmail", "u@example.org", stdin=message("dropped"))
    assert code == 0, out + err
    wrong = {path: uid for path, uid in owners(spool.root).items() if uid != OWNER}
    assert wrong == {}, f"root-owned files in the spool: {wrong}"
    proc = await serve_as_owner(env_for(home, sink.port))
    try:
        await eventually(lambda: sink.messages, timeout=20, what="delivery of the maildrop")
    finally:
        assert await proc.stop() == 0
    assert corrupt(home) == []


async def test_a_file_the_daemon_cannot_read_is_reported_not_quarantined(home, sink):
    """A root-owned 0600 message in a nobody daemon's queue/: an error line with the fix, the
    file stays where it is (not corrupt/), and the other messages are delivered."""
    spool = owned_spool(home)
    good = spool.put("app@example.com", ["u@example.org"], message("good"), time.time())
    locked = spool.put("app@example.com", ["u@example.org"], message("locked"), time.time())
    chown_tree(spool.root)
    os.chown(spool.path("queue", locked.id, "eml"), 0, 0)
    proc = await serve_as_owner(env_for(home, sink.port))
    try:
        await eventually(lambda: sink.messages, timeout=20, what="delivery of the readable one")
        await eventually(
            lambda: proc.events("spool.unreadable") or proc.events("spool.quarantined"),
            what="spool.unreadable (or a quarantine)",
        )
    finally:
        assert await proc.stop() == 0
    assert corrupt(home) == []
    unreadable = proc.events("spool.unreadable")
    assert [m.data.count(b"Subject: good") for m in sink.messages] == [1]
    assert good.id not in os.listdir(spool.root / "queue")
    assert f"{locked.id}.eml" in os.listdir(spool.root / "queue")
    assert corrupt(home) == []
    assert unreadable[0]["level"] == "error" and "chown" in unreadable[0]["fix"]


async def test_another_user_is_refused_with_one_line_naming_the_owner(home, sink):
    """Not root and not the owner: `relayd queue retry` exits 1 with one line naming who owns
    the spool, and changes nothing."""
    spool = owned_spool(home)
    env = spool.put("app@example.com", ["u@example.org"], message("x"), time.time())
    chown_tree(spool.root)
    before = owners(spool.root)
    stranger = ["setpriv", "--reuid=65533", "--regid=65533", "--clear-groups"]
    python, extra = _owner_python()
    code, _out, err = await run_cli(
        {**env_for(home, sink.port), **extra},
        "queue",
        "retry",
        env.id,
        prefix=stranger,
        python=python,
    )
    assert code == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "nobody" in err and str(OWNER) in err, err
    assert owners(spool.root) == before
