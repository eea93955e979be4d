"""Operator commands (queue, check, health, sendmail); they print, cli picks exit codes."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from relayd.spool import FAILED, QUEUE, Spool


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    queue = sub.add_parser("queue", help="inspect and steer the spool")
    qsub = queue.add_subparsers(dest="queue_command", required=True)
    ls = qsub.add_parser("list", parents=[common], help="one row per message")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--state", choices=[QUEUE + "d", FAILED])
    ls.set_defaults(func=dispatch)


def dispatch(args: argparse.Namespace) -> int:
    from relayd.cli import load_config

    cfg = load_config(args)
    spool = Spool(cfg.spool.path)
    if args.command == "queue" and args.queue_command == "list":
        rows = [e.to_json() for e in spool.scan(QUEUE)]
        json.dump(rows, sys.stdout, indent=1)
        print()
        return 0
    return 2


def sendmail_entry(argv: list[str]) -> int:
    print("relayd-sendmail: not implemented yet", file=sys.stderr)
    return 75
