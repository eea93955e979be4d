"""`relayd health`: is the daemon up, its event loop turning and its spool writable?

Prints one line and exits 0 (healthy) or 1. The daemon proves it is up by holding the spool
lock, and that its loop turns by rewriting <spool>/status.json every few seconds; this command
proves the spool takes writes by creating and removing a file in tmp/ (and that queue/ and
failed/ are not on a read-only mount). The daemon's own report turns it red too: a spool
that refused to record an outcome, or no delivery process ready for relay.hang_timeout.
Upstream trouble (a run of failed attempts, an old queue) is reported, and fails the check
only with --strict:
a provider outage is what the spool is for, so by default it must not get relayd restarted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from relayd.cli.common import load_config, say
from relayd.spool import Spool
from relayd.states import SpoolDir
from relayd.wire import STATUS_FILE, DaemonStatus

__all__ = ["STATUS_FILE", "add_parser", "check", "report", "run"]

STALE_AFTER = 30.0  # seconds without a status update before the daemon counts as stuck


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "health",
        parents=[common],
        help="exit 0 when the daemon is up and its spool writable (one line)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="also fail on upstream trouble (see --max-failures, --max-age)",
    )
    p.add_argument(
        "--max-failures",
        type=int,
        default=3,
        metavar="N",
        help="with --strict: failed upstream attempts in a row tolerated (default 3)",
    )
    p.add_argument(
        "--max-age",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="with --strict: age of the oldest queued message tolerated (default 3600)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the verdict and the daemon's status as JSON (per upstream: state, pause, "
        "quota, rate)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    root = Path(cfg.spool.path)
    ok, line, status = evaluate(root, args.strict, args.max_failures, args.max_age)
    if getattr(args, "json", False):
        say(json.dumps(report(root, ok, line, status)))  # one ASCII line: say() keeps it whole
    else:
        say(f"relayd: {line}")
    return 0 if ok else 1


def check(
    root: Path, strict: bool = False, max_failures: int = 3, max_age: float = 3600.0
) -> tuple[bool, str]:
    """(healthy, one line saying why) for the daemon serving the spool at root."""
    ok, line, _ = evaluate(root, strict, max_failures, max_age)
    return ok, line


def evaluate(
    root: Path, strict: bool = False, max_failures: int = 3, max_age: float = 3600.0
) -> tuple[bool, str, DaemonStatus | None]:
    """check(), and the daemon's status when it could be read."""
    pid = Spool(root).daemon_pid()
    if pid is None:
        return False, f"down: no relayd holds the lock of {root}", None
    status, problem = _read_status(root, pid)
    # Before the status's own problems: a read-only spool also keeps status.json from being
    # rewritten, and "not writable" is the cause where "stuck" would only be the symptom.
    probe = _probe_write(root) or _read_only(root)
    if probe:
        return False, f"unhealthy: spool {root} not writable: {probe}", status
    if status is None:
        return False, f"unhealthy: pid {pid} {problem}", None
    trouble_line = _daemon_trouble(root, status)
    if trouble_line:
        return False, f"unhealthy: pid {pid} {trouble_line}", status
    failures = status.delivery.consecutive_failures
    oldest = status.delivery.oldest_age
    waiting = _waiting_upstreams(status)
    trouble = failures >= max_failures or oldest > max_age or bool(waiting)
    summary = ", ".join([_summary(status, failures, oldest), *waiting])
    if strict and trouble:
        return False, f"upstream trouble: {summary}", status
    return True, f"{'healthy (upstream trouble)' if trouble else 'healthy'}: {summary}", status


def _waiting_upstreams(status: DaemonStatus) -> list[str]:
    """One phrase per upstream that is not in use now (open, paused, reauth, …)."""
    phrases = []
    for doc in status.delivery.upstreams:
        state = str(doc.get("state") or "")
        if state in ("", "ok", "throttled"):
            continue
        reason = " ".join(str(doc.get("reason") or "").split())[:200]
        phrase = f"upstream {doc.get('name')} {state}"
        if reason:
            phrase += f" ({reason})"  # say() escapes it for the terminal, json.dumps for --json
        probe = doc.get("next_probe_at")
        if isinstance(probe, int | float):
            phrase += f", next probe in {max(0.0, probe - time.time()):.0f}s"
        phrases.append(phrase)
    return phrases


def report(root: Path, ok: bool, line: str, status: DaemonStatus | None) -> dict[str, Any]:
    """--json: the verdict and what the daemon last reported (per upstream: state, paused
    until, throttled, reauth, next probe, today's count against daily, the rate in force)."""
    pid = Spool(root).daemon_pid()
    doc: dict[str, Any] = {"healthy": ok, "line": line, "summary": line, "pid": pid}
    if status is None:
        return {**doc, "status": None, "upstreams": []}
    return {
        **doc,
        "queued": status.delivery.queued,
        "failed": status.failed,
        "status": status.to_json(),
        "upstreams": list(status.delivery.upstreams),
    }


def _read_status(root: Path, pid: int) -> tuple[DaemonStatus | None, str]:
    """The daemon's status when it is current, else (None, what is wrong)."""
    try:
        doc = json.loads((root / STATUS_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, "has written no status yet (starting?)"
    except OSError as exc:
        return None, f"status unreadable: {exc.strerror}"
    except ValueError:
        return None, "status unreadable: not JSON"
    if not isinstance(doc, dict) or doc.get("pid") != pid:
        return None, "has written no status yet (starting?)"
    try:
        status = DaemonStatus.from_json(doc)
    except (TypeError, ValueError):
        return None, "status unreadable: not a relayd status"
    age = time.time() - status.updated_at
    if age > STALE_AFTER:
        return None, f"has not updated its status for {age:.0f}s (event loop stuck?)"
    return status, ""


def _probe_write(root: Path) -> str:
    """'' when a file can be created, written and removed in tmp/; else the reason."""
    path = root / SpoolDir.TMP / f"health.{os.getpid()}.probe"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"relayd health\n")
        finally:
            os.close(fd)
        path.unlink()
    except OSError as exc:
        with contextlib.suppress(OSError):
            path.unlink()
        return exc.strerror or str(exc)
    return ""


def _read_only(root: Path) -> str:
    """'' unless queue/ or failed/ is on a read-only mount (root can still write tmp/)."""
    for sub in (SpoolDir.QUEUE, SpoolDir.FAILED):
        with contextlib.suppress(OSError):
            if os.statvfs(root / sub).f_flag & os.ST_RDONLY:
                return f"{root / sub} is on a read-only mount"
    return ""


def _daemon_trouble(root: Path, status: DaemonStatus) -> str:
    """What the daemon itself reports as broken, in words; '' when nothing is."""
    error = status.delivery.spool_error
    if error:
        since = float(error.get("since") or time.time())
        held = int(error.get("held") or 0)
        return (
            f"cannot record outcomes: spool {root} not writable: {error.get('text')} "
            f"(for {time.time() - since:.0f}s; {held} message(s) held in memory, not resent)"
        )
    return status.delivery_down


def _summary(status: DaemonStatus, failures: int, oldest: float) -> str:
    parts = [f"pid {status.pid}", f"{status.delivery.queued} queued"]
    if oldest:
        parts[-1] += f" (oldest {oldest:.0f}s)"
    parts.append(f"{status.failed} failed")
    error = status.delivery.last_error
    last_delivery = status.delivery.last_delivery_at
    if failures and error is not None:
        code = f"{error.get('code')} " if error.get("code") else ""
        text = " ".join(str(error.get("text") or "").split())[:200]  # replies can be multi-line
        parts.append(
            f"{failures} failed attempts in a row, last at {error.get('step')}: {code}{text}"
        )
        if error.get("hint"):  # e.g. an OAuth grant that only a new login fixes
            parts.append(f"fix: {' '.join(str(error['hint']).split())[:300]}")
    elif last_delivery:
        parts.append(f"last delivery {time.time() - last_delivery:.0f}s ago")
    return ", ".join(parts)
