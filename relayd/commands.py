"""Operator commands (queue, check, sendmail): registration and what they share.

The CLI never sends mail. It edits the spool through Spool's locked, atomic operations and
then signals the daemon that holds <spool>/relayd.lock: SIGUSR2 to rescan queue/ (the
daemon keeps the ids it is delivering in memory, so a rescan never starts a second delivery
of one), SIGUSR1 to make everything due now.
"""

from __future__ import annotations

import argparse
import os
import signal
from typing import Any

from relayd.config import Config
from relayd.errors import SpoolError
from relayd.spool import Spool
from relayd.states import SpoolDir


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    from relayd import check, queue_cmd, sendmail

    queue_cmd.add_parsers(sub, common)
    check.add_parser(sub, common)
    sendmail.add_parser(sub, common)


def config(args: argparse.Namespace) -> Config:
    from relayd.cli import load_config

    return load_config(args)


def open_spool(cfg: Config) -> Spool:
    """The configured spool, which must exist (the daemon creates it at its first start)."""
    spool = Spool(cfg.spool.path)
    if not (spool.root / SpoolDir.QUEUE).is_dir():
        raise SpoolError(f"no spool at {spool.root} (has `relayd serve` ever run with it?)")
    if not os.access(spool.root / SpoolDir.QUEUE, os.R_OK | os.X_OK):
        raise SpoolError(f"cannot read {spool.root}: run as the user relayd runs as")
    return spool


def signal_daemon(spool: Spool, sig: signal.Signals = signal.SIGUSR2) -> int | None:
    """Tell the running daemon (if any) to rescan; returns its pid, or None if none runs."""
    pid = spool.daemon_pid()
    if pid is None:
        return None
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return None
    except PermissionError:
        raise SpoolError(f"cannot signal relayd (pid {pid}): run as the user it runs as") from None
    return pid


def sendmail_entry(argv: list[str]) -> int:
    """The `relayd-sendmail` console script (link it as /usr/sbin/sendmail)."""
    from relayd import sendmail

    return sendmail.main(argv)
