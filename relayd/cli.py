"""Command line: serve | queue … | check | health | sendmail | --version.

cli and the command modules it registers (commands, health) are the only code that prints;
cli alone picks exit codes: 0 ok, 1 failure, 2 usage, 75 temporary failure (sendmail,
EX_TEMPFAIL), 78 bad configuration (EX_CONFIG; systemd's RestartPreventExitStatus).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from relayd import __version__, logs
from relayd import config as config_mod
from relayd.config import Config
from relayd.errors import ConfigError, RelaydError

EX_OK, EX_FAIL, EX_USAGE, EX_TEMPFAIL, EX_CONFIG = 0, 1, 2, 75, 78
DEV_SPOOL = "relayd-dev-spool"


class Parser(argparse.ArgumentParser):
    """argparse with relayd's one-line usage errors (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EX_USAGE, f"{self.prog}: {message} (see --help)\n")


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
    serve = sub.add_parser("serve", parents=[common], help="run the daemon in the foreground")
    serve.add_argument(
        "--dev",
        action="store_true",
        help=f"no provider: write messages to <spool>/outbox/ (spool ./{DEV_SPOOL} by default)",
    )
    serve.set_defaults(func=cmd_serve)
    from relayd import auth, commands, health

    commands.add_parsers(sub, common)
    health.add_parser(sub, common)
    auth.add_parser(sub, common)
    return parser


def load_config(args: argparse.Namespace, dev: bool = False) -> Config:
    """The config every command uses: --config file, then RELAYD_* from the environment."""
    environ = dict(os.environ)
    cfg = config_mod.load(args.config, environ)
    spool_set = bool(environ.get("RELAYD_SPOOL_PATH") or environ.get("STATE_DIRECTORY"))
    if dev and not spool_set and cfg.spool.path == config_mod.DEFAULT_SPOOL:
        cfg = dataclasses.replace(cfg, spool=dataclasses.replace(cfg.spool, path=DEV_SPOOL))
    return cfg


def cmd_serve(args: argparse.Namespace) -> int:
    from relayd import app

    cfg = load_config(args, dev=args.dev)
    if not args.dev and not cfg.upstream.host:
        raise ConfigError(
            "upstream.host",
            "required (or run `relayd serve --dev` to try relayd without a provider)",
        )
    logs.setup(cfg.log.format, cfg.log.level)
    return app.run(cfg, args.config, args.dev, os.environ)


def run_command(func: object, args: argparse.Namespace) -> int:
    """Run a command function, turning relayd's errors into one line and an exit code."""
    try:
        code = func(args)  # type: ignore[operator]  # set by set_defaults(func=...)
        return int(code)
    except ConfigError as exc:
        print(f"relayd: config: {logs.redact(str(exc))}", file=sys.stderr)
        return EX_CONFIG
    except RelaydError as exc:
        print(f"relayd: {logs.redact(str(exc))}", file=sys.stderr)
        return EX_FAIL
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EX_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)


def sendmail_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `relayd-sendmail` script (link it as /usr/sbin/sendmail)."""
    from relayd import commands

    return commands.sendmail_entry(list(sys.argv[1:] if argv is None else argv))
