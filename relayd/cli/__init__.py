"""Command line: serve | queue … | check | health | sendmail | passwd | oauth … | --version.

One module per command (each with add_parser(sub, common) and its run functions) and
cli.common for what they share; this package only assembles the parser and holds the two
console-script entry points.

Only the chosen command's module is imported: `relayd health` is a container's HEALTHCHECK,
run every few seconds, and must not pay for aiohttp, aiosmtplib and the daemon. The other
commands appear in `--help` from COMMANDS alone (tests/test_cli_lazy.py keeps it true).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from relayd import __version__
from relayd.cli.common import Parser, run_command

__all__ = ["COMMANDS", "build_parser", "main", "sendmail_main"]

# (name, module, help), in --help's order; each help is the one its module's add_parser gives.
COMMANDS = (
    ("serve", "relayd.cli.serve", "run the daemon in the foreground"),
    ("queue", "relayd.cli.queue", "inspect and steer the spool"),
    ("check", "relayd.cli.check", "diagnose each upstream step by step"),
    (
        "sendmail",
        "relayd.cli.sendmail",
        "sendmail-compatible submission (also installed as relayd-sendmail)",
    ),
    (
        "health",
        "relayd.cli.health",
        "exit 0 when the daemon is up and its spool writable (one line)",
    ),
    ("passwd", "relayd.cli.passwd", "print a users-file line for a submitter"),
    ("oauth", "relayd.cli.oauth", "sign in to the provider (OAuth2Config) and show token state"),
)


def chosen(argv: Sequence[str]) -> str | None:
    """The command argv names (its first word that is not an option), if any."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with command, only that command's module is imported (None: all of them)."""
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
    for name, module, help_text in COMMANDS:
        if command is None or name == command:
            importlib.import_module(module).add_parser(sub, common)
        else:  # listed in --help, never chosen: parsing picked the command beforehand
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    command = chosen(words)
    if command not in {name for name, _, _ in COMMANDS}:
        command = ""  # --help, --version or a typo: the listing is enough, import nothing
    args = build_parser(command).parse_args(words)
    return run_command(args.func, args)


def sendmail_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `relayd-sendmail` script (link it as /usr/sbin/sendmail)."""
    from relayd.cli import sendmail

    return sendmail.main(list(sys.argv[1:] if argv is None else argv))
