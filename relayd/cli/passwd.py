"""`relayd passwd NAME [--stdin]`: print a users-file line for a submitter."""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from relayd.auth import hash_password


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    cmd = sub.add_parser("passwd", help="print a users-file line for a submitter")
    cmd.add_argument("name", help="the name the app will log in with")
    cmd.add_argument("--stdin", action="store_true", help="read the password from standard input")
    cmd.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print `name:hash`; the password itself is read, hashed and never echoed."""
    if ":" in args.name or not args.name.strip():
        print("relayd passwd: the name must be non-empty and contain no ':'", file=sys.stderr)
        return 2
    if args.stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("relayd passwd: the passwords differ", file=sys.stderr)
            return 1
    if len(password) < 8:
        print("relayd passwd: use at least 8 characters", file=sys.stderr)
        return 1
    print(f"{args.name}:{hash_password(password)}")
    return 0
