"""What every command shares: the parser class, exit codes, config, spool and daemon signals.

Commands are the only code that prints; run_command alone turns relayd's errors into one line
and an exit code: 0 ok, 1 failure, 2 usage, 75 temporary failure (sendmail, EX_TEMPFAIL),
78 bad configuration (EX_CONFIG; systemd's RestartPreventExitStatus).

The CLI never sends mail. It edits the spool through Spool's locked, atomic operations and
then signals the daemon that holds <spool>/relayd.lock: SIGUSR2 to rescan queue/ (the
daemon keeps the ids it is delivering in memory, so a rescan never starts a second delivery
of one), SIGUSR1 to make everything due now.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pwd
import signal
import sys
from pathlib import Path
from typing import NoReturn

from relayd import config as config_mod
from relayd import logs, text
from relayd.config import Config
from relayd.errors import ConfigError, LibraryError, RelaydError, SpoolError
from relayd.spool import Spool
from relayd.states import SpoolDir

EX_OK, EX_FAIL, EX_USAGE, EX_TEMPFAIL, EX_CONFIG = 0, 1, 2, 75, 78
DEV_SPOOL = "relayd-dev-spool"


class Parser(argparse.ArgumentParser):
    """argparse with relayd's one-line usage errors (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EX_USAGE, f"{self.prog}: {message} (see --help)\n")


def load_config(args: argparse.Namespace, dev: bool = False, serve: bool = False) -> Config:
    """The config every command uses: --config file, then RELAYD_* from the environment.

    Only `serve` validates the listener's exposure (config.load's serve).
    """
    environ = dict(os.environ)
    cfg = config_mod.load(args.config, environ, serve=serve)
    spool_set = bool(environ.get("RELAYD_SPOOL_PATH") or environ.get("STATE_DIRECTORY"))
    if dev and not spool_set and cfg.spool.path == config_mod.DEFAULT_SPOOL:
        cfg = dataclasses.replace(cfg, spool=dataclasses.replace(cfg.spool, path=DEV_SPOOL))
    return cfg


def open_spool(cfg: Config, write: bool = False) -> Spool:
    """The configured spool, which must exist (the daemon creates it at its first start).

    write: the command will change it, so it runs as the spool's owner from here on (see
    become_owner): files it writes must be ones the daemon can read.
    """
    spool = Spool(cfg.spool.path)
    if write:
        become_owner(spool)
    try:
        exists = (spool.root / SpoolDir.QUEUE).is_dir()
    except PermissionError:
        raise SpoolError(f"cannot read {spool.root}: {_run_as(spool.root)}") from None
    if not exists:
        raise SpoolError(f"no spool at {spool.root} (has `relayd serve` ever run with it?)")
    if not os.access(spool.root / SpoolDir.QUEUE, os.R_OK | os.X_OK):
        raise SpoolError(f"cannot read {spool.root}: {_run_as(spool.root)}")
    return spool


def become_owner(spool: Spool) -> None:
    """Run as the user owning the spool, before writing to it; or refuse, naming the owner.

    A root-run writer (`sudo relayd queue retry`, the sendmail maildrop) would leave root-owned
    0600 files the daemon cannot read. Root drops to the owner (groups, gid, uid: for good); a
    different user is refused. A spool that does not exist yet is left to the caller.
    """
    try:
        st = os.stat(spool.root)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SpoolError(f"cannot use {spool.root}: {exc.strerror}") from None
    if os.geteuid() == st.st_uid:
        return
    if os.geteuid() != 0:
        raise SpoolError(f"cannot change {spool.root}: {_run_as(spool.root)}")
    try:
        entry = pwd.getpwuid(st.st_uid)
        os.initgroups(entry.pw_name, entry.pw_gid)
        os.setgid(entry.pw_gid)
    except KeyError:  # a uid without a name (a container's volume): its files' group
        os.setgroups([])
        os.setgid(st.st_gid)
    os.setuid(st.st_uid)


def _run_as(root: os.PathLike[str]) -> str:
    """'it belongs to NAME (uid N): run as that user or as root'."""
    try:
        uid = os.stat(root).st_uid
    except OSError:
        return "run as the user relayd runs as"
    try:
        name = f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        name = f"uid {uid}"
    return f"it belongs to {name}: run as that user (or as root)"


def signal_daemon(spool: Spool, sig: signal.Signals = signal.SIGUSR2) -> int | None:
    """Tell the running daemon (if any) to rescan; returns its pid, or None if none runs.

    A daemon holds the lock but its pid names no relayd here when it runs in another pid
    namespace (another container on the same volume): the pid in relayd.lock is then some
    other process of ours, often this very command as pid 1, and signalling it would report
    success while the daemon never heard. Say so, and how to reach it.
    """
    pid = spool.daemon_pid()
    if pid is None:
        return None
    if not _is_daemon(pid):
        raise SpoolError(
            f"a relayd serves {spool.root} but not in this pid namespace (its pid {pid} is "
            "not relayd here), so it was not told; from its container run: "
            "docker exec <container> relayd queue flush"
        )
    try:
        os.kill(pid, sig)
    except PermissionError:
        raise SpoolError(f"cannot signal relayd (pid {pid}): run as the user it runs as") from None
    return pid


def _is_daemon(pid: int) -> bool:
    """Whether pid is a `relayd serve` in this pid namespace (True when /proc cannot tell)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return False
    except OSError:
        return True  # /proc hidden from us (hidepid): let kill decide
    return b"serve" in argv and any(b"relayd" in arg for arg in argv)


def run_command(func: object, args: argparse.Namespace) -> int:
    """Run a command function, turning relayd's errors into one line and an exit code."""
    try:
        code = func(args)  # type: ignore[operator]  # set by set_defaults(func=...)
        return int(code)
    except ConfigError as exc:
        warn(f"relayd: config: {exc}")
        return EX_CONFIG
    except LibraryError as exc:  # 78 too: like a bad config, restarting cannot mend it
        warn(f"relayd: {exc}")
        return EX_CONFIG
    except RelaydError as exc:
        warn(f"relayd: {exc}")
        return EX_FAIL
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EX_OK


def _shown(line: str) -> str:
    # Secrets out first, then strangers' control characters escaped (text.printable): every
    # line a command shows a person passes here, so neither reaches the terminal.
    return text.printable(logs.redact(line)) + "\n"


def say(*lines: str) -> None:
    """Print lines on stdout for a person: secrets redacted, control characters escaped.

    Each line is one line: a newline inside one is a stranger's and is shown as \\n.
    """
    sys.stdout.write("".join(_shown(line) for line in lines or ("",)))
    sys.stdout.flush()


def warn(line: str) -> None:
    """say() for stderr: errors and notes that are not the command's output."""
    sys.stderr.write(_shown(line))
    sys.stderr.flush()
