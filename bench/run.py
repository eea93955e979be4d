"""relayd benchmark: a real `relayd serve` against a local implicit-TLS sink that requires AUTH.

    python bench/run.py                          # 2000 x 1 KiB, 10 concurrent app sessions
    python bench/run.py -n 500 --size 102400     # bigger messages
    python bench/run.py -n 200 -c 1 --delay-ms 100   # time to 250 while the upstream is slow
    python bench/run.py -n 1000 --one-way-ms 25      # a far provider: 50 ms round trips
    python bench/run.py -n 1 -c 1 --size 26214400    # one 25 MiB message: memory growth
    python bench/run.py --queued 100000 -n 2000  # start-up, queue list and accept with a backlog
    python bench/run.py --upstream-down          # ... and the same accept with an empty queue

Each app session is one connection per message (EHLO, MAIL, RCPT, DATA, QUIT), the way a web
app sends one email. Prints one line of key=value figures (and, with --json, a JSON object):
accepted/s (until the last 250), delivered/s (until the sink counted every message), p50/p99
time from connect to the 250 after DATA, peak RSS of relayd's processes (VmHWM, summed), RSS
growth over the idle baseline, and how many AUTH logins the sink saw. Needs the test extras
(`pip install -e '.[test]'`) for the throwaway CA. Loopback only; every process it starts is
stopped by its pid before it returns.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def proc_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def tree_kib(pid: int, field: str) -> int:
    """proc_kib summed over relayd's processes (the listener and its delivery process)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            children = [int(c) for c in fh.read().split()]
    except OSError:
        children = []
    total = proc_kib(pid, field)
    for child in children:
        with contextlib.suppress(OSError):  # the child may have just exited
            total += proc_kib(child, field)
    return total


def make_certs(tmp: Path) -> tuple[Path, Path, Path]:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, cert_file, key_file = tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_pem.write_to_path(str(key_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    return ca_file, cert_file, key_file


class Sink:
    """bench/sink.py in its own process; stats() asks it for its counters."""

    def __init__(
        self, cert: Path, key: Path, delay_ms: float, arrivals: str = "", chunking: bool = True
    ) -> None:
        cmd = [sys.executable, str(HERE / "sink.py"), "--cert", str(cert), "--key", str(key)]
        if arrivals:
            cmd += ["--arrivals", arrivals]
        cmd += [] if chunking else ["--no-chunking"]
        self.proc = subprocess.Popen(
            [*cmd, "--delay-ms", str(delay_ms)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline().strip().split("=")[1])

    def stats(self) -> dict[str, int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return dict(json.loads(self.proc.stdout.readline()))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class DelayProxy:
    """bench/delayproxy.py in its own process: every byte one_way_ms late, each direction."""

    def __init__(self, target_port: int, one_way_ms: float) -> None:
        args = ["--target", f"127.0.0.1:{target_port}", "--one-way-ms", str(one_way_ms)]
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "delayproxy.py"), *args],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline().strip().split("=")[1])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Relayd:
    """`relayd serve` as a subprocess with a config written for the bench."""

    def __init__(self, workdir: Path, upstream_port: int, ca_file: Path, extra: dict[str, str]):
        self.workdir = workdir
        self.spool = workdir / "spool"
        self.env = {
            **os.environ,
            "RELAYD_LISTEN_PORT": "0",
            "RELAYD_SPOOL_PATH": str(self.spool),
            "RELAYD_UPSTREAM_HOST": "127.0.0.1",
            "RELAYD_UPSTREAM_PORT": str(upstream_port),
            "RELAYD_UPSTREAM_CA_FILE": str(ca_file),
            "RELAYD_UPSTREAM_USERNAME": "bench",
            "RELAYD_UPSTREAM_PASSWORD": "bench-password",
            "RELAYD_RETRY_INITIAL_DELAY": "3600",
            "RELAYD_LOG_FORMAT": "json",
            "RELAYD_LOG_LEVEL": "warning",
            **extra,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.ready_s = 0.0

    def start(self, timeout: float = 60.0) -> None:
        """Spawn relayd and wait until its port accepts connections (that is "ready")."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.env["RELAYD_LISTEN_PORT"] = str(self.port)
        started = time.monotonic()
        with open(self.workdir / "relayd.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relayd", "serve"],
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        while time.monotonic() < started + timeout and self.proc.poll() is None:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    self.ready_s = time.monotonic() - started
                    return
            time.sleep(0.01)
        self.stop()
        raise SystemExit(f"relayd did not start; see {self.workdir / 'relayd.log'}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def message(size: int, seq: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    body = (line * (size // len(line) + 1))[:size]
    head = b"From: bench@example.com\r\nTo: sink@example.net\r\nSubject: bench %d\r\n\r\n" % seq
    return head + body + b"\r\n"


async def send_one(port: int, payload: bytes) -> float:
    """One app-side submission; returns seconds from connect to the 250 after DATA."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:

        async def expect(code: bytes) -> None:
            while True:
                line = await reader.readline()
                if not line.startswith(code):
                    raise RuntimeError(f"expected {code!r}, got {line!r}")
                if line[3:4] != b"-":
                    return

        await expect(b"220")
        for cmd, code in (
            (b"EHLO app.bench", b"250"),
            (b"MAIL FROM:<bench@example.com>", b"250"),
            (b"RCPT TO:<sink@example.net>", b"250"),
            (b"DATA", b"354"),
        ):
            writer.write(cmd + b"\r\n")
            await expect(code)
        writer.write(payload + b".\r\n")  # payload lines start with "x" or a header: no stuffing
        await expect(b"250")
        elapsed = time.perf_counter() - t0
        writer.write(b"QUIT\r\n")
        await reader.readline()
        return elapsed
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def load(port: int, n: int, concurrency: int, size: int) -> list[float]:
    payload = message(size, 0)
    todo = iter(range(n))
    latencies: list[float] = []

    async def session() -> None:
        for _ in todo:
            latencies.append(await send_one(port, payload))

    await asyncio.gather(*(session() for _ in range(concurrency)))
    return latencies


def prefill(spool_dir: Path, count: int, size: int) -> None:
    """Write `count` deferred messages straight into the spool (not fsynced: setup only)."""
    from relayd.spool import Spool, _dumps

    spool = Spool(spool_dir)
    spool.create()
    data = message(size, 0)
    now = time.time()
    from relayd.spool import Envelope, Recipient

    for _ in range(count):
        env = Envelope(
            id=spool.new_id(),
            mail_from="bench@example.com",
            rcpt_to=(Recipient("sink@example.net"),),
            created_at=now,
            size=len(data),
            attempts=1,
            next_attempt_at=now + 3600,
            last_error={"step": "connect", "code": None, "text": "connection refused"},
        )
        for ext, content in (("eml", data), ("json", _dumps(env))):
            fd = os.open(spool.path("queue", env.id, ext), os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, content)
            os.close(fd)


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round((len(xs) - 1) * p / 100))]


def run(opts: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="relayd-bench-") as tmp_name:
        tmp = Path(tmp_name)
        ca_file, cert, key = make_certs(tmp)
        sink = Sink(cert, key, opts.delay_ms, chunking=not opts.no_chunking)
        proxy = DelayProxy(sink.port, opts.one_way_ms) if opts.one_way_ms else None
        extra = {"RELAYD_UPSTREAM_MAX_CONNECTIONS": str(opts.max_connections)}
        down = bool(opts.queued or opts.upstream_down)
        if down:
            extra["RELAYD_UPSTREAM_PORT"] = "1"  # the upstream is down while the backlog sits
        upstream_port = proxy.port if proxy else sink.port
        relayd = Relayd(tmp, upstream_port, ca_file, {k: v for k, v in extra.items() if v != "0"})
        result: dict[str, Any] = {"n": opts.n, "concurrency": opts.concurrency, "size": opts.size}
        if proxy:
            result["one_way_ms"] = opts.one_way_ms
        try:
            if opts.queued:
                prefill(relayd.spool, opts.queued, 1024)
                result["queued"] = opts.queued
            relayd.start()
            assert relayd.proc is not None
            pid = relayd.proc.pid
            result["ready_s"] = round(relayd.ready_s, 3)
            if opts.queued:
                t0 = time.monotonic()
                subprocess.run(
                    [sys.executable, "-m", "relayd", "queue", "list", "--json"],
                    cwd=ROOT,
                    env=relayd.env,
                    stdout=subprocess.DEVNULL,
                    check=True,
                )
                result["queue_list_s"] = round(time.monotonic() - t0, 3)
            base_rss = tree_kib(pid, "VmRSS")
            before = sink.stats()
            t0 = time.perf_counter()
            lat = asyncio.run(load(relayd.port, opts.n, opts.concurrency, opts.size))
            accepted_s = time.perf_counter() - t0
            delivered = 0
            if not down:
                deadline = time.monotonic() + opts.timeout
                while time.monotonic() < deadline:
                    delivered = sink.stats()["messages"] - before["messages"]
                    if delivered >= opts.n:
                        break
                    time.sleep(0.02)
            done_s = time.perf_counter() - t0
            after = sink.stats()
            result.update(
                accepted_per_s=round(opts.n / accepted_s, 1),
                delivered=delivered,
                delivered_per_s=round(delivered / done_s, 1) if delivered else 0.0,
                p50_ms=round(statistics.median(lat) * 1000, 2),
                p99_ms=round(pct(lat, 99) * 1000, 2),
                peak_rss_mib=round(tree_kib(pid, "VmHWM") / 1024, 1),
                rss_growth_mib=round((tree_kib(pid, "VmHWM") - base_rss) / 1024, 1),
                logins=after["logins"] - before["logins"],
                peak_upstream_sessions=after["peak_active"],
            )
        finally:
            relayd.stop()
            if proxy:
                proxy.stop()
            sink.stop()
        return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=2000, help="messages (default 2000)")
    ap.add_argument("-c", "--concurrency", type=int, default=10, help="app sessions (10)")
    ap.add_argument("--size", type=int, default=1024, help="body bytes (1024)")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="sink delay per reply")
    ap.add_argument(
        "--one-way-ms",
        type=float,
        default=0.0,
        help="put a TCP proxy between relayd and the sink that delays every byte this long",
    )
    ap.add_argument("--no-chunking", action="store_true", help="the sink hides CHUNKING (BDAT)")
    ap.add_argument(
        "--max-connections",
        type=int,
        default=0,
        help="upstream.max_connections (default: relayd's)",
    )
    ap.add_argument("--queued", type=int, default=0, help="messages already queued, upstream down")
    ap.add_argument(
        "--upstream-down",
        action="store_true",
        help="upstream down, nothing queued: the baseline for --queued",
    )
    ap.add_argument("--timeout", type=float, default=300.0, help="wait this long for delivery")
    ap.add_argument("--json", action="store_true", help="print a JSON object instead")
    opts = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    result = run(opts)
    if opts.json:
        print(json.dumps(result))
    else:
        print(" ".join(f"{k}={v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
