"""The daemon: spool + listener + relay, signals, readiness, graceful stop.

By default the relay runs in a second process (relayd.worker, supervised by
supervisor.DeliveryProcess) so accepting and delivering each get a core; with
relay.separate_process false both share this process's event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from relayd import config as config_mod
from relayd import eventloop, fences, routes
from relayd.config import Config, UpstreamConfig
from relayd.endpoint import Endpoint
from relayd.errors import RelaydError
from relayd.housekeeping import Chores, Housekeeping
from relayd.notify import Notifier
from relayd.outbox import Outbox
from relayd.relay import Deliverer, Relay
from relayd.server import Handler, Listener
from relayd.signals import Signals, describe_upstreams, register_secrets
from relayd.spool import Spool
from relayd.states import SpoolDir, TlsMode
from relayd.supervisor import DeliveryProcess
from relayd.upstream import Session

log = structlog.get_logger()

STOP_DEADLINE = 10.0  # seconds for in-flight sessions and deliveries after SIGTERM
LOOP_STALL = 10.0  # /healthz fails when the event loop has not ticked for this long


@dataclass
class Daemon(Signals, Housekeeping):
    cfg: Config
    config_path: str | None
    dev: bool
    environ: Mapping[str, str]
    signals: bool = True
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    ready: bool = False
    address: tuple[str, int] = ("", 0)

    def __post_init__(self) -> None:
        self.spool = Spool(self.cfg.spool.path)
        self.notifier = Notifier(self.environ)
        self.relay: Relay | DeliveryProcess = (
            DeliveryProcess(self.cfg, self.dev)
            if self.cfg.relay.separate_process
            else Relay(self.spool, self.cfg, self._connect)
        )
        self.endpoint: Endpoint | None = None
        self.heartbeat = time.monotonic()
        self.failed_count = 0
        self.chores = Chores()
        # Signals that came before the daemon was ready, acted on once it is.
        self._early: dict[int, Callable[[], Awaitable[None]]] = {}
        self.gauged: set[str] = set()  # upstreams with relayd_upstream_state series
        self.upstream_states: tuple[dict[str, Any], ...] = ()  # as of the last housekeeping

    def _connect(self, up: UpstreamConfig) -> Deliverer:
        if self.dev:
            return Outbox(self.spool)
        return Session(up, up.ehlo_name or self.cfg.listen.hostname)

    async def run(self) -> int:
        # Before the pid is published in relayd.lock: the queue commands and sendmail signal
        # that pid, and a SIGUSR2 without a handler would end a daemon still scanning its queue.
        if self.signals:
            self._install_signals()
        for note in await fences.check():  # before the spool or a socket is touched
            log.warning("library.fallback_used", detail=note)
        self.spool.create()
        self.spool.lock()
        await asyncio.to_thread(self.spool.sweep_tmp)
        depth = await self.relay.load()
        listener = await self._listen()
        host, port = self.address
        self._start_metrics()
        self._warn_insecure()
        self._log_started(depth)
        self.ready = True
        self.started.set()
        self._act_on_early()
        self.notifier.send("READY=1", f"STATUS=listening on {host}:{port}, {depth} queued")
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.relay.run(self.stop, STOP_DEADLINE))
            tg.create_task(self._housekeeping())
            await self.stop.wait()
            self.ready = False
            self.notifier.send("STOPPING=1", "STATUS=stopping")
            log.info("server.stopping", queued=self.relay.depth)
            await listener.stop(STOP_DEADLINE)
        if self.endpoint is not None:
            await asyncio.to_thread(self.endpoint.stop)
        if self.signals:
            self._remove_signals()
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self._write_status, self._status())
        self.spool.unlock()
        log.info("server.stopped", queued=self.relay.depth)
        return 0

    async def _listen(self) -> Listener:
        """Bind the listener; on failure stop the delivery process and release the spool."""
        handler = Handler(
            self.cfg.listen, self.spool, self.relay.enqueue, router=routes.from_config(self.cfg)
        )
        self.handler = handler
        listener = Listener(self.cfg.listen, handler)
        try:
            self.address = await listener.start()
        except OSError as exc:
            if isinstance(self.relay, DeliveryProcess):
                await self.relay.stop(0.0)  # no delivery process may outlive a failed start
            self.spool.unlock()
            where = f"{self.cfg.listen.host}:{self.cfg.listen.port}"
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise RelaydError(f"cannot listen on {where}: {why}") from None
        return listener

    def _log_started(self, depth: int) -> None:
        host, port = self.address
        log.info(
            "server.started",
            host=host,
            port=port,
            queued=depth,
            pid=os.getpid(),
            event_loop="uvloop"
            if type(asyncio.get_running_loop()).__module__.startswith("uvloop")
            else "asyncio",
            upstream="outbox (dev)" if self.dev else describe_upstreams(self.cfg),
        )

    def _warn_insecure(self) -> None:
        if self.dev:
            log.warning(
                "dev_mode",
                detail="NOT relaying: every message is written to "
                f"{self.spool.root / SpoolDir.OUTBOX} instead of being sent",
            )
            return
        for up in self.cfg.upstreams:
            if up.tls == TlsMode.NONE:
                log.warning(
                    "upstream.plaintext",
                    upstream=up.name,
                    detail="tls is none: mail and credentials cross the network unencrypted",
                )
            if not up.verify:
                log.warning(
                    "upstream.unverified",
                    upstream=up.name,
                    detail="verify is false: any "
                    "certificate is accepted, so anyone on the path can read the mail",
                )

    def _start_metrics(self) -> None:
        if not self.cfg.metrics.listen:
            return
        host, port = config_mod.parse_hostport("metrics.listen", self.cfg.metrics.listen)
        loop = asyncio.get_running_loop()

        def alive() -> str:
            stalled = time.monotonic() - self.heartbeat
            if stalled >= LOOP_STALL:
                return f"event loop stalled for {stalled:.0f}s"
            return self.delivery_problem()

        def refresh() -> None:
            # Called on the HTTP thread: the relay's state is read on the loop, not here.
            # A loop that is stuck or gone leaves the last values in place.
            coro = self._update_gauges()
            try:
                future = asyncio.run_coroutine_threadsafe(coro, loop)
            except RuntimeError:  # the loop is closed: the daemon is stopping
                coro.close()
                return
            with contextlib.suppress(TimeoutError, concurrent.futures.CancelledError):
                future.result(timeout=LOOP_STALL / 2)

        self.endpoint = Endpoint(
            host, port, lambda: self.ready, alive, refresh, unroutable=self.unroutable
        )
        self.endpoint.start()
        log.info("metrics.started", host=self.endpoint.address[0], port=self.endpoint.address[1])


def run(cfg: Config, config_path: str | None, dev: bool, environ: Mapping[str, str]) -> int:
    """Run the daemon in the foreground until SIGTERM/SIGINT; returns the exit code."""
    register_secrets(cfg)
    return eventloop.run(Daemon(cfg, config_path, dev, environ).run(), cfg.relay.event_loop)
