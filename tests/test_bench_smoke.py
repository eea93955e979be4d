"""The benchmark keeps working: a tiny run end to end (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_run_delivers_a_few_messages() -> None:
    """bench/run.py starts relayd and its sink, sends 5 messages and reports them delivered."""
    args = ["-n", "5", "-c", "2", "--json", "--timeout", "20"]
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["delivered"] == 5
    assert result["logins"] >= 1
    assert result["logins"] <= result["peak_upstream_sessions"] + 5
    for key in ("accepted_per_s", "delivered_per_s", "p50_ms", "p99_ms", "peak_rss_mib"):
        assert result[key] > 0, key
