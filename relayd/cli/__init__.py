"""Command line: serve | queue … | check | health | sendmail | passwd | oauth … | --version.

One module per command (each with add_parser(sub, common) and its run functions) and
cli.common for what they share; this package only assembles the parser and holds the two
console-script entry points.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from relayd import __version__
from relayd.cli import check, health, oauth, passwd, queue, sendmail, serve
from relayd.cli.common import Parser, run_command

__all__ = ["build_parser", "main", "sendmail_main"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="relayd", description="A durable local SMTP relay.")
    parser.add_argument("--version", action="version", version=f"relayd {__version__}")
    common = Parser(add_help=False)
    common.add_argument(
        "--config",
        "-c",
        metavar="PATH",
        default=os.environ.get("RELAYD_CONFIG"),
        help="YAML config file (default: $RELAYD_CONFIG, else built-in defaults + RELAYD_*)",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in (serve, queue, check, sendmail, health, passwd, oauth):
        command.add_parser(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)


def sendmail_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `relayd-sendmail` script (link it as /usr/sbin/sendmail)."""
    return sendmail.main(list(sys.argv[1:] if argv is None else argv))
