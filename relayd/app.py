"""The daemon: spool + listener + relay, signals, readiness, graceful stop.

By default the relay runs in a second process (relayd.worker, supervised by
supervisor.DeliveryProcess) so accepting and delivering each get a core; with
relay.separate_process false both share this process's event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from relayd import config as config_mod
from relayd import eventloop, fences, logs, metrics, pool, routes, wire
from relayd.breaker import UpstreamState
from relayd.config import Config, UpstreamConfig
from relayd.endpoint import Endpoint
from relayd.errors import ConfigError, RelaydError
from relayd.notify import Notifier
from relayd.outbox import Outbox
from relayd.relay import Deliverer, Relay
from relayd.server import Handler, Listener
from relayd.spool import Spool
from relayd.states import SpoolDir, TlsMode
from relayd.supervisor import DeliveryProcess
from relayd.upstream import Session

log = structlog.get_logger()

STOP_DEADLINE = 10.0  # seconds for in-flight sessions and deliveries after SIGTERM
HOUSEKEEPING = 2.0  # seconds between gauge/status refreshes (shorter with a faster watchdog)
LOOP_STALL = 10.0  # /healthz fails when the event loop has not ticked for this long
# With no delivery process ready for this many relay.hang_timeouts (5 min by default) the
# WATCHDOG=1 pings stop, so systemd restarts the whole daemon: a fresh start is worth a try
# once restarting the delivery process alone kept failing. Health is red long before that.
RESTART_AFTER_HANG_TIMEOUTS = 10


@dataclass
class Daemon:
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
        for action in self._early.values():
            _spawn(action())
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

    def delivery_problem(self) -> str:
        """Why mail is not being delivered (no delivery process ready for a while), or ''."""
        return self.relay.problem() if isinstance(self.relay, DeliveryProcess) else ""

    def _watchdog_due(self) -> bool:
        """WATCHDOG=1 while the loop turns, unless deliveries have been down too long."""
        if not self.notifier.watchdog_interval:
            return False
        if not isinstance(self.relay, DeliveryProcess):
            return True
        limit = RESTART_AFTER_HANG_TIMEOUTS * self.cfg.relay.hang_timeout
        if self.relay.down_for() < limit:
            return True
        log.error("watchdog.withheld", detail=f"{self.delivery_problem()}; systemd restarts relayd")
        return False

    async def _housekeeping(self) -> None:
        """Watchdog ping, gauges, STATUS= and status.json; proves the event loop is alive.

        No step's failure ends the daemon (out of descriptors, EMFILE, each of them fails):
        each is logged when it starts failing and when it works again, and tried next round.
        """
        interval = min(self.notifier.watchdog_interval or HOUSEKEEPING, HOUSEKEEPING)
        while not self.stop.is_set():
            self.heartbeat = time.monotonic()
            if self._watchdog_due():
                ok = self.notifier.send("WATCHDOG=1")
                self.chores.report("watchdog", "" if ok else self.notifier.error)
            await self.chores.run("gauges", self._update_gauges())
            snap = self.relay.snapshot()
            problem = self.delivery_problem()
            self.notifier.send(
                f"STATUS={snap.queued} queued, {snap.in_flight} in flight"
                + (f"; {problem}" if problem else "")
            )
            await self.chores.run("status", asyncio.to_thread(self._write_status, self._status()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self.stop.wait()

    async def _update_gauges(self) -> None:
        """Set the queue gauges from the relay's index (on the loop: it is not thread-safe)."""
        snap = self.relay.snapshot()
        metrics.QUEUE_DEPTH.labels(state=SpoolDir.QUEUE).set(snap.queued)
        metrics.OLDEST_AGE.set(snap.oldest_age)
        for up in snap.upstreams:
            metrics.set_upstream(up)
        self.failed_count = await asyncio.to_thread(_count, self.spool.root / SpoolDir.FAILED)
        metrics.QUEUE_DEPTH.labels(state=SpoolDir.FAILED).set(self.failed_count)
        self.upstream_states = snap.upstreams
        self._upstream_gauges(snap.upstreams)

    def _upstream_gauges(self, upstreams: tuple[dict[str, Any], ...]) -> None:
        names = {str(doc.get("name")) for doc in upstreams}
        for gone in self.gauged - names:  # removed by a reload: its series go too
            for state in UpstreamState:
                with contextlib.suppress(KeyError):
                    metrics.UPSTREAM_STATE.remove(gone, state)
        self.gauged = names
        for doc in upstreams:
            for state in UpstreamState:
                metrics.UPSTREAM_STATE.labels(upstream=doc.get("name"), state=state).set(
                    1.0 if doc.get("state") == state else 0.0
                )

    def unroutable(self) -> str:
        """Which routes have no upstream usable now ("" when every one has): /readyz?upstreams."""
        now = time.time()
        # Called on the HTTP thread: it reads the copy housekeeping took on the loop.
        usable = {str(doc.get("name")): pool.usable_state(doc, now) for doc in self.upstream_states}
        if not usable:
            return ""  # the delivery process has not reported yet: nothing known is broken
        names = routes.unroutable(routes.from_config(self.relay.cfg), usable)
        return f"no usable upstream for route {', '.join(names)}" if names else ""

    def _status(self) -> wire.DaemonStatus:
        """What `relayd health` reads: built on the loop, written by a thread."""
        return wire.DaemonStatus(
            pid=os.getpid(),
            updated_at=time.time(),
            ready=self.ready,
            failed=self.failed_count,
            delivery=self.relay.snapshot(),
            delivery_down=self.delivery_problem(),
        )

    def _write_status(self, status: wire.DaemonStatus) -> None:
        """A small status file for `relayd health` (advisory, not fsynced)."""
        path = Path(self.spool.root) / wire.STATUS_FILE
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(status.to_json()))
        tmp.replace(path)


class Chores:
    """Housekeeping steps that may fail for a while: logged once as they start failing and
    once as they work again, never raised (an error there must not end the daemon)."""

    def __init__(self) -> None:
        self.failing: dict[str, str] = {}

    async def run(self, step: str, coro: Awaitable[None]) -> None:
        """Await one step; an exception is reported, not raised."""
        try:
            await coro
        except Exception as exc:
            self.report(step, str(exc) if isinstance(exc, OSError) else repr(exc))
            return
        self.report(step, "")

    def report(self, step: str, error: str) -> None:
        """error '' means the step worked."""
        if error and step not in self.failing:
            log.error(
                "housekeeping.failed",
                step=step,
                error=error,
                detail="the daemon goes on and tries again every few seconds",
            )
        elif not error and step in self.failing:
            log.info("housekeeping.recovered", step=step, error=self.failing[step])
        if error:
            self.failing[step] = error
        else:
            self.failing.pop(step, None)


def _count(directory: Path) -> int:
    """Messages in a state directory (one .eml each); 0 when it cannot be listed."""
    try:
        return sum(1 for name in os.listdir(directory) if name.endswith(".eml"))
    except OSError:
        return 0


_background: set[asyncio.Task[Any]] = set()


def _spawn(coro: Any) -> None:
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)


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


def run(cfg: Config, config_path: str | None, dev: bool, environ: Mapping[str, str]) -> int:
    """Run the daemon in the foreground until SIGTERM/SIGINT; returns the exit code."""
    register_secrets(cfg)
    return eventloop.run(Daemon(cfg, config_path, dev, environ).run(), cfg.relay.event_loop)
