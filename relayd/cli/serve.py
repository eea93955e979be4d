"""`relayd serve [--dev]`: run the daemon in the foreground."""

from __future__ import annotations

import argparse
import os
from typing import Any

import structlog

from relayd import logs
from relayd.cli.common import DEV_SPOOL, load_config
from relayd.errors import ConfigError, RelaydError


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    serve = sub.add_parser("serve", parents=[common], help="run the daemon in the foreground")
    serve.add_argument(
        "--dev",
        action="store_true",
        help=f"no provider: write messages to <spool>/outbox/ (spool ./{DEV_SPOOL} by default)",
    )
    serve.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from relayd import app  # the daemon's imports are paid only by `serve`

    cfg = load_config(args, dev=args.dev, serve=True)
    if not args.dev and not cfg.upstream.host:
        raise ConfigError(
            "upstream.host",
            "required (or run `relayd serve --dev` to try relayd without a provider)",
        )
    logs.setup(cfg.log.format, cfg.log.level)
    try:
        return app.run(cfg, args.config, args.dev, os.environ)
    except (RelaydError, KeyboardInterrupt):
        raise
    except Exception as exc:
        # Not an error relayd expected (an OSError nobody translated, a bug): one line for the
        # operator, the traceback only at log.level debug.
        structlog.get_logger().debug("server.crashed", exc_info=exc)
        raise RelaydError(f"unexpected error: {type(exc).__name__}: {exc}") from None
