"""Command line: serve | queue … | check | health | sendmail | --version.

The only module that prints or picks exit codes: 0 ok, 1 failure, 2 usage, 75 temporary
failure (sendmail, EX_TEMPFAIL), 78 bad configuration (EX_CONFIG; systemd's
RestartPreventExitStatus).
"""

from __future__ import annotations

import argparse
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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EX_USAGE, f"relayd: {message} (see relayd --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="relayd", description="A durable local SMTP relay.")
    parser.add_argument("--version", action="version", version=f"relayd {__version__}")
    common = _Parser(add_help=False)
    common.add_argument(
        "--config",
        "-c",
        metavar="PATH",
        default=os.environ.get("RELAYD_CONFIG"),
        help="YAML config file (default: $RELAYD_CONFIG, else built-in defaults + RELAYD_*)",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve = sub.add_parser("serve", parents=[common], help="run the daemon in the foreground")
    serve.add_argument(
        "--dev",
        action="store_true",
        help=f"no provider: write messages to <spool>/outbox/ (spool ./{DEV_SPOOL} by default)",
    )
    from relayd import commands

    commands.add_parsers(sub, common)
    return parser


def load_config(args: argparse.Namespace, dev: bool = False) -> Config:
    environ = dict(os.environ)
    cfg = config_mod.load(args.config, environ)
    spool_set = bool(environ.get("RELAYD_SPOOL_PATH") or environ.get("STATE_DIRECTORY"))
    if dev and not spool_set and cfg.spool.path == config_mod.DEFAULT_SPOOL:
        import dataclasses

        if not args.config or "path" not in _file_keys(args.config, "spool"):
            cfg = dataclasses.replace(cfg, spool=dataclasses.replace(cfg.spool, path=DEV_SPOOL))
    return cfg


def _file_keys(path: str, section: str) -> set[str]:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError):
        return set()
    sec = data.get(section) if isinstance(data, dict) else None
    return set(sec) if isinstance(sec, dict) else set()


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return cmd_serve(args)
        from relayd import commands

        return commands.dispatch(args)
    except ConfigError as exc:
        print(f"relayd: config: {exc}", file=sys.stderr)
        return EX_CONFIG
    except RelaydError as exc:
        print(f"relayd: {logs.redact(str(exc))}", file=sys.stderr)
        return EX_FAIL
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EX_OK


def sendmail_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `relayd-sendmail` script (link it as /usr/sbin/sendmail)."""
    from relayd import commands

    return commands.sendmail_entry(list(sys.argv[1:] if argv is None else argv))
