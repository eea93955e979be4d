"""Crash campaign: kill -9 `relayd serve` at random moments under load; prove nothing is lost.

Each run starts the daemon on one spool, lets several clients submit a burst of messages (each
with a unique X-Relayd-Test-Id header) while a slow upstream drains the queue, and kills the
daemon with SIGKILL at a random moment. After the last run a clean daemon drains what is left.
Then what clients got 250 for is compared with what the upstream received:

    lost        acknowledged with 250 but never delivered          must be 0
    duplicates  deliveries beyond the first of one id              must be <= in flight at kills
    in flight   at each kill: upstream transactions open, plus messages the upstream had
                accepted whose removal from queue/ had not happened yet

Usage: python scripts/crash_campaign.py [--runs 20] [--burst 1000] [--clients 8] [--seed N]
Exit status 0 when the guarantees held, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

import aiosmtplib  # noqa: E402 - after the path set-up the test helpers need
from conftest import eventually, make_pki  # noqa: E402
from faults import FaultServer  # noqa: E402
from proc import CAPTURED, ServeProcess, serve_env  # noqa: E402

HEADER = b"X-Relayd-Test-Id"


@dataclass
class Summary:
    runs: int = 0
    messages: int = 0  # submissions attempted
    acknowledged: set[str] = field(default_factory=set)
    delivered: int = 0  # upstream receptions, duplicates included
    unique: int = 0
    lost: list[str] = field(default_factory=list)
    duplicates: int = 0
    unexplained: list[str] = field(default_factory=list)  # duplicates not in flight at a kill
    in_flight: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.lost and not self.unexplained and self.duplicates <= sum(self.in_flight)

    def lines(self) -> list[str]:
        return [
            f"runs                {self.runs}",
            f"messages submitted  {self.messages}",
            f"acknowledged (250)  {len(self.acknowledged)}",
            f"delivered           {self.delivered} ({self.unique} distinct)",
            f"lost                {len(self.lost)}",
            f"duplicates          {self.duplicates}",
            f"in flight at kills  {sum(self.in_flight)} total, max {max(self.in_flight or [0])}",
            f"unexplained dups    {len(self.unexplained)}",
            f"seconds             {self.seconds:.1f}",
            f"result              {'OK' if self.ok else 'FAILED'}",
        ]


def body(msg_id: str) -> bytes:
    return (
        f"From: app@example.com\r\nTo: u@example.org\r\nSubject: crash {msg_id}\r\n"
        f"{HEADER.decode()}: {msg_id}\r\n\r\nmessage {msg_id}\r\n"
    ).encode()


async def client(port: int, ids: itertools.count[int], limit: int, run: int, s: Summary) -> None:
    """Submit over one connection until the burst is done or the daemon dies."""
    smtp = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=port, start_tls=False, local_hostname="crash.test", timeout=10
    )
    try:
        await smtp.connect()
        while (n := next(ids)) < limit:
            msg_id = f"r{run}-m{n}"
            s.messages += 1
            await smtp.sendmail("app@example.com", ["u@example.org"], body(msg_id))
            s.acknowledged.add(msg_id)  # only after the 250 to DATA
    except (aiosmtplib.SMTPException, OSError):
        pass  # the kill: this message has no 250, so the client would retry it
    finally:
        smtp.close()


def queued_ids(spool: Path) -> set[str]:
    out = set()
    for eml in (spool / "queue").glob("*.eml"):
        for line in eml.read_bytes().split(b"\r\n"):
            if line.startswith(HEADER + b":"):
                out.add(line.split(b":", 1)[1].strip().decode())
    return out


async def one_run(
    run: int, env: dict[str, str], fs: FaultServer, s: Summary, burst: int, clients: int
) -> set[str]:
    """Submit a burst, SIGKILL at a random moment; returns the ids in flight at the kill."""
    proc = await ServeProcess(env).start()
    ids = itertools.count()
    tasks = [asyncio.create_task(client(proc.port, ids, burst, run, s)) for _ in range(clients)]
    await asyncio.sleep(random.uniform(0.05, 2.5))
    open_at_kill = len(fs.open_txns)
    await proc.kill9()
    await asyncio.gather(*tasks)
    await eventually(lambda: fs.active == 0, timeout=30, what="upstream sessions closed")
    delivered = {m.decode() for m in fs.received(HEADER)}
    accepted_not_removed = delivered & queued_ids(Path(env["RELAYD_SPOOL_PATH"]))
    s.in_flight.append(open_at_kill + len(accepted_not_removed))
    s.runs += 1
    return accepted_not_removed


async def drain(env: dict[str, str], fs: FaultServer, s: Summary) -> None:
    """A clean daemon delivers what the kills left queued."""
    spool = Path(env["RELAYD_SPOOL_PATH"])
    fs.faults.pop("slow", None)  # the kills are over: let the backlog go at full speed
    proc = await ServeProcess({**env, "RELAYD_UPSTREAM_MAX_CONNECTIONS": "16"}).start()
    try:
        await eventually(
            lambda: not list((spool / "queue").glob("*.eml")), timeout=900, what="drained"
        )
    finally:
        await proc.stop()


def tally(fs: FaultServer, s: Summary, in_flight_ids: set[str]) -> None:
    got = [m.decode() for m in fs.received(HEADER)]
    counts: dict[str, int] = {}
    for msg_id in got:
        counts[msg_id] = counts.get(msg_id, 0) + 1
    s.delivered, s.unique = len(got), len(counts)
    s.lost = sorted(s.acknowledged - set(counts))
    s.duplicates = sum(c - 1 for c in counts.values())
    s.unexplained = sorted(i for i, c in counts.items() if c > 1 and i not in in_flight_ids)


async def campaign(
    runs: int, burst: int, clients: int, workdir: Path, pipelining: bool = False
) -> Summary:
    """Run the whole campaign in workdir and return its tally."""
    started = time.monotonic()
    pki = make_pki(workdir, "127.0.0.1", "localhost")
    s = Summary()
    async with FaultServer(pki) as fs:
        fs.pipelining = pipelining  # relayd then sends flights of several messages per write
        fs.slow_delay = 0.01  # every upstream reply 10 ms late: the queue never quite empties
        fs.fail("slow")
        # Info, not the suite's debug: thousands of messages per run.
        env = serve_env(workdir / "spool", fs.port, pki.ca_file, log_level="info")
        in_flight_ids: set[str] = set()
        for run in range(runs):
            in_flight_ids |= await one_run(run, env, fs, s, burst, clients)
            CAPTURED.clear()  # kept for the test suite's secret check, not needed here
        await drain(env, fs, s)
        tally(fs, s, in_flight_ids)
    s.seconds = time.monotonic() - started
    return s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--burst", type=int, default=1000, help="messages offered per run")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--pipelining", action="store_true", help="the upstream offers PIPELINING (flights)"
    )
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    random.seed(seed)
    with tempfile.TemporaryDirectory(prefix="relayd-crash-") as tmp:
        s = asyncio.run(campaign(args.runs, args.burst, args.clients, Path(tmp), args.pipelining))
    print(f"seed                {seed}")
    print("\n".join(s.lines()))
    return 0 if s.ok else 1


if __name__ == "__main__":
    sys.exit(main())
