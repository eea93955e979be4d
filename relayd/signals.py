"""The daemon's signals: SIGTERM/SIGINT stop, SIGHUP reload, SIGUSR1 flush, SIGUSR2 rescan.

Installed before the pid is published, so a signal sent while the queue is still scanned is
acted on once the daemon is ready, not lost and never fatal. A reload keeps the running config
when the new one is bad. A mixin of app.Daemon, which sets these.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog

from relayd import config as config_mod
from relayd import logs, routes
from relayd.config import Config
from relayd.errors import ConfigError
from relayd.notify import Notifier
from relayd.relay import Relay
from relayd.server import Handler
from relayd.supervisor import DeliveryProcess

log = structlog.get_logger()


class Signals:
    """The signal side of app.Daemon (a mixin: Daemon sets these)."""

    cfg: Config
    config_path: str | None
    dev: bool
    environ: Mapping[str, str]
    stop: asyncio.Event
    started: asyncio.Event
    notifier: Notifier
    relay: Relay | DeliveryProcess
    handler: Handler
    _early: dict[int, Callable[[], Awaitable[None]]]

    def _act_on_early(self) -> None:
        """The signals that came while starting, acted on now that the daemon is ready."""
        for action in self._early.values():
            _spawn(action())

    def _install_signals(self) -> None:
        """SIGTERM/SIGINT stop (at once, or as soon as started); the others act once ready."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop.set)
        loop.add_signal_handler(signal.SIGINT, self.stop.set)
        actions: dict[int, Callable[[], Awaitable[None]]] = {
            signal.SIGHUP: self.reload,
            signal.SIGUSR1: self._flush,
            signal.SIGUSR2: self.rescan,
        }
        for sig, action in actions.items():
            loop.add_signal_handler(sig, self._on_signal, sig, action)

    def _on_signal(self, sig: int, action: Callable[[], Awaitable[None]]) -> None:
        if self.started.is_set():
            _spawn(action())
        else:
            self._early[sig] = action  # twice while starting is once, as signals coalesce

    def _remove_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            loop.remove_signal_handler(sig)

    async def _flush(self) -> None:
        self.relay.flush()
        log.info("queue.flushed", queued=self.relay.depth)

    async def rescan(self) -> None:
        """Re-read queue/ after an operator edit (relayd queue retry/delete signal this)."""
        depth = await self.relay.rescan()
        log.info("queue.rescanned", queued=depth)

    async def reload(self) -> None:
        """SIGHUP: re-read the config; keep the old one if the new one is bad."""
        self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            new = config_mod.load(self.config_path, self.environ)
            if not self.dev:
                require_hosts(new)
        except ConfigError as exc:
            log.error("config.reload_failed", error=str(exc), detail="keeping the running config")
            self.notifier.send("READY=1")
            return
        register_secrets(new)
        if new.listen != self.cfg.listen or new.spool != self.cfg.spool:
            log.warning("config.restart_needed", detail="listen and spool changes need a restart")
        # The next delivery logs in with the new credentials.
        self.relay.reconfigure(
            dataclasses.replace(
                new,
                listen=self.cfg.listen,
                spool=self.cfg.spool,
                metrics=self.cfg.metrics,
                relay=self.cfg.relay,
            )
        )
        # Logged under the level in force when the signal came, so the operator sees it.
        log.info("config.reloaded", upstream=describe_upstreams(new))
        router = routes.from_config(new)
        self.handler.router = None if router.takes_everyone else router
        logs.setup(new.log.format, new.log.level)
        self.notifier.send("READY=1", "STATUS=config reloaded")


def register_secrets(cfg: Config) -> None:
    for up in cfg.upstreams:
        logs.add_auth_forms(up.username, up.password)
        logs.add_secrets([up.oauth2.client_secret])  # tokens: oauth.TokenSource
    if cfg.pacing.redis_password:
        logs.add_secrets([cfg.pacing.redis_password])


def require_hosts(cfg: Config) -> None:
    """Every upstream needs a host (only --dev runs without one)."""
    for i, up in enumerate(cfg.upstreams):
        if not up.host:  # only the single upstream: section can lack one (list entries cannot)
            raise ConfigError("upstream.host" if i == 0 else f"upstreams[{i}].host", "required")


def describe_upstreams(cfg: Config) -> str:
    return ", ".join(f"{u.name}={u.host}:{u.port}" for u in cfg.upstreams)


_background: set[asyncio.Task[Any]] = set()


def _spawn(coro: Any) -> None:
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)
