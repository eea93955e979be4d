"""The delivery process's entry point (`python -m relayd.worker`): the relay loop over the spool.

Started and fed by supervisor.DeliveryProcess in the listener process, over the pipe records of
relayd.wire. It holds ``<spool>/relay.lock``, so one still draining after its listener died
finishes before the next one starts: never two senders on one spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import sys
from typing import Any

import structlog

from relayd import eventloop, logs, metrics, wire
from relayd.config import Config, UpstreamConfig
from relayd.outbox import Outbox
from relayd.relay import Deliverer, Relay
from relayd.spool import Spool
from relayd.upstream import Session

log = structlog.get_logger()

REPORT = 0.5  # seconds between status/metrics reports to the listener
DRAIN_TIMEOUT = 10.0  # seconds in-flight deliveries get once the listener says stop


def _emit(record: wire.Alive | wire.Ready | wire.Report | wire.Failed) -> None:
    with contextlib.suppress(OSError):  # the listener is gone; end of stdin stops us next
        os.write(1, wire.encode(record))


async def _commands(relay: Relay, stop: asyncio.Event, stdin: asyncio.StreamReader) -> None:
    async for raw in stdin:
        try:
            doc = json.loads(raw)
        except ValueError:
            log.error("worker.bad_command")
            continue
        await _obey(relay, wire.command_from_json(doc) if isinstance(doc, dict) else None)
    stop.set()  # end of input: the listener is stopping or gone


async def _obey(relay: Relay, command: wire.Command | None) -> None:
    if isinstance(command, wire.Queued):
        if command.id not in relay.inflight:
            relay.add(command.id, command.due, command.created, command.sender, command.rcpts)
    elif isinstance(command, wire.Flush):
        relay.flush()
    elif isinstance(command, wire.Rescan):
        depth = await relay.rescan()
        log.info("queue.rescanned", queued=depth)
    elif isinstance(command, wire.Reconfigure):
        new = command.config
        _register_secrets(new)
        relay.reconfigure(new)
        logs.setup(new.log.format, new.log.level)


def _register_secrets(cfg: Config) -> None:
    for up in cfg.upstreams:
        logs.add_auth_forms(up.username, up.password)
        logs.add_secrets([up.oauth2.client_secret])  # tokens: oauth.TokenSource
    if cfg.pacing.redis_password:
        logs.add_secrets([cfg.pacing.redis_password])


def _report_once(relay: Relay, events: list[Any]) -> None:
    batch, events[:] = list(events), []
    _emit(wire.Report(relay.snapshot(), tuple(batch)))


async def _alive() -> None:
    while True:  # a heartbeat until the status reports take over
        _emit(wire.Alive())
        await asyncio.sleep(REPORT)


async def _report(relay: Relay, events: list[Any]) -> None:
    while True:  # a periodic report, not a wait for a condition
        _report_once(relay, events)
        await asyncio.sleep(REPORT)


def _lock(spool: Spool) -> int:
    """Block until no other worker delivers from this spool (a predecessor may be draining)."""
    fd = os.open(spool.root / "relay.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.warning("worker.waiting", detail="another delivery process is still draining")
        fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


async def _main() -> int:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    first = await stdin.readline()
    if not first:
        return 0  # the listener went away before it said anything
    start = wire.Start.from_json(json.loads(first))
    cfg, dev = start.config, start.dev
    # Waiting for relay.lock and scanning a large queue take a while: say we are alive meanwhile,
    # or the listener's watchdog (relay.hang_timeout) would take us for stuck.
    alive = asyncio.create_task(_alive())
    logs.setup(cfg.log.format, cfg.log.level)
    _register_secrets(cfg)
    spool = Spool(cfg.spool.path)
    await asyncio.to_thread(_lock, spool)
    events: list[Any] = []
    metrics.forward(events)

    def connect(up: UpstreamConfig) -> Deliverer:
        return Outbox(spool) if dev else Session(up, up.ehlo_name or cfg.listen.hostname)

    relay = Relay(spool, cfg, connect)
    _emit(wire.Ready(await relay.load()))
    alive.cancel()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    commands = asyncio.create_task(_commands(relay, stop, stdin))
    reporter = asyncio.create_task(_report(relay, events))
    await relay.run(stop, DRAIN_TIMEOUT)
    for task in (commands, reporter):
        task.cancel()
    await asyncio.gather(commands, reporter, return_exceptions=True)
    _report_once(relay, events)
    return 0


def main() -> int:
    # Ctrl-C in a terminal reaches the whole process group: the listener decides when to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return eventloop.run(_main(), sys.argv[1] if len(sys.argv) > 1 else "asyncio")
    except Exception as exc:
        # One line in the log and the reason to the listener, which reports it in health.
        reason = f"{type(exc).__name__}: {exc}"
        log.error("worker.failed", error=reason)
        log.debug("worker.failed_traceback", exc_info=exc)
        _emit(wire.Failed(reason))
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
