"""Pacing benchmark: does relayd keep to an upstream's rate, alone and as a fleet through Redis?

    python bench/pacing.py single [-n 600] [--rate 300/minute] [--burst 10]
    python bench/pacing.py fleet  [-n 240] [--rate 120/minute] [--burst 4] [--outage-at 40
                                   --outage-for 30]

``single``: n messages are submitted at once to one relayd whose upstream has ``rate``; the
sink logs each arrival. Reported: the most arrivals any window of the rate's period holds
(bound: burst + the rate's count; --window checks a shorter one), and the mean rate after the
first burst against the limit.

``fleet``: two relayds with the same account share one real redis-server (pacing.redis,
fleet_size 2), n/2 messages each. With --outage-at, Redis is killed that many seconds after the
first arrival and started again --outage-for seconds later: sending goes on at each relayd's
1/fleet_size share, and both rejoin (pacing.rejoined in their logs). A scaled-down run (a
faster rate over fewer messages) keeps the same bounds: every figure is relative to the rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "tests")]

from run import Relayd, Sink, load, make_certs  # noqa: E402 - after the path set-up

from relayd.pacing import parse_rate  # noqa: E402


def most_in_window(times: list[float], window: float) -> int:
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def arrivals(path: Path) -> list[float]:
    text = path.read_text(encoding="ascii") if path.exists() else ""
    return sorted(float(x) for x in text.split())


def wait_for(path: Path, n: int, timeout: float, tick: Any = None) -> list[float]:
    deadline = time.monotonic() + timeout
    while True:
        times = arrivals(path)
        if tick is not None:
            tick(times)
        if len(times) >= n or time.monotonic() > deadline:
            return times
        time.sleep(0.2)


def figures(times: list[float], rate: str, burst: int, window: float) -> dict[str, Any]:
    count, period = parse_rate(rate)
    limit = count / period
    window = window or period
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    # The steady rate, from the first message after the burst: the burst's sessions open
    # (TLS, AUTH) while later messages reuse them, which would shorten the span.
    rest = times[burst:]
    steady = (len(rest) - 1) / (rest[-1] - rest[0]) if len(rest) > 1 else 0.0
    return {
        "rate": rate,
        "burst": burst,
        "arrived": len(times),
        "duration_s": round(span, 2),
        "window_s": window,
        "max_in_window": most_in_window(times, window),
        "bound": burst + int(window * limit),
        "mean_per_s": round(steady, 4),
        "limit_per_s": round(limit, 4),
        "mean_vs_limit": round(steady / limit - 1, 4),
    }


def relayd(workdir: Path, name: str, sink: Sink, ca: Path, env: dict[str, str]) -> Relayd:
    d = workdir / name
    d.mkdir()
    r = Relayd(d, sink.port, ca, env)
    r.start()
    return r


def single(opts: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    ca, cert, key = make_certs(workdir)
    log = workdir / "arrivals"
    sink = Sink(cert, key, 0.0, str(log))
    env = {"RELAYD_UPSTREAM_RATE": opts.rate, "RELAYD_UPSTREAM_BURST": str(opts.burst)}
    r = relayd(workdir, "relayd", sink, ca, env)
    try:
        asyncio.run(load(r.port, opts.n, 10, 512))
        times = wait_for(log, opts.n, opts.timeout)
    finally:
        r.stop()
        sink.stop()
    return {"scenario": "single", **figures(times, opts.rate, opts.burst, opts.window)}


def fleet(opts: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from redisproc import RedisServer

    ca, cert, key = make_certs(workdir)
    log = workdir / "arrivals"
    sink = Sink(cert, key, 0.0, str(log))
    redis = RedisServer(workdir).start()
    env = {
        "RELAYD_UPSTREAM_RATE": opts.rate,
        "RELAYD_UPSTREAM_BURST": str(opts.burst),
        "RELAYD_PACING_REDIS": redis.url,
        "RELAYD_PACING_FLEET_SIZE": "2",
        "RELAYD_LOG_LEVEL": "info",
    }
    fleet_ = [relayd(workdir, f"relayd{i}", sink, ca, env) for i in (1, 2)]
    outage: dict[str, float] = {}

    def tick(times: list[float]) -> None:
        if not opts.outage_at or not times:
            return
        elapsed = time.time() - times[0]
        if "stopped" not in outage and elapsed >= opts.outage_at:
            redis.stop()
            outage["stopped"] = time.time()
        elif "started" not in outage and elapsed >= opts.outage_at + opts.outage_for:
            redis.start()
            outage["started"] = time.time()

    try:

        async def submit_all() -> None:
            await asyncio.gather(*(load(r.port, opts.n // 2, 5, 512) for r in fleet_))

        asyncio.run(submit_all())
        times = wait_for(log, opts.n // 2 * 2, opts.timeout, tick)
    finally:
        for r in fleet_:
            r.stop()
        redis.stop()
        sink.stop()
    result = {
        "scenario": "fleet",
        "relayds": 2,
        **figures(times, opts.rate, opts.burst, opts.window),
    }
    if outage.get("stopped"):
        end = outage.get("started", times[-1])
        during = [t for t in times if outage["stopped"] <= t < end]
        count, period = parse_rate(opts.rate)
        result["outage_s"] = round(end - outage["stopped"], 2)
        result["outage_per_s"] = round(len(during) / (end - outage["stopped"]), 4)
        result["fallback_share_per_s"] = round(count / period / 2, 4)
        logs = [(workdir / f"relayd{i}" / "relayd.log").read_text() for i in (1, 2)]
        result["fallback_logged"] = [text.count('"pacing.fallback"') for text in logs]
        result["rejoined_logged"] = [text.count('"pacing.rejoined"') for text in logs]
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario", choices=["single", "fleet"])
    ap.add_argument("-n", type=int, default=0, help="messages (600 single, 240 fleet)")
    ap.add_argument("--rate", default="", help='upstream.rate ("300/minute", "120/minute")')
    ap.add_argument("--burst", type=int, default=0, help="upstream.burst (10 single, 4 fleet)")
    ap.add_argument("--window", type=float, default=0.0, help="window s (the rate's period)")
    ap.add_argument("--outage-at", type=float, default=0.0, help="fleet: stop Redis after s")
    ap.add_argument("--outage-for", type=float, default=30.0, help="fleet: restart after s")
    ap.add_argument("--timeout", type=float, default=900.0, help="give up after this long")
    opts = ap.parse_args(argv)
    # A SIGTERM (e.g. from timeout(1)) still runs the finally blocks that stop relayd and Redis.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    is_single = opts.scenario == "single"
    opts.n = opts.n or (600 if is_single else 240)
    opts.rate = opts.rate or ("300/minute" if is_single else "120/minute")
    opts.burst = opts.burst or (10 if is_single else 4)
    with tempfile.TemporaryDirectory(prefix="relayd-pacing-") as tmp:
        result = (single if is_single else fleet)(opts, Path(tmp))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
