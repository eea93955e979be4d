"""`relayd health`: is the daemon up and its spool writable? (filled in by the ops work)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("health", parents=[common], help="exit 0 when the daemon is healthy")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return 1
