"""Log lines on a shared stderr: the listener and its delivery process write to one pipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys

LINES = 5000  # per process; the old print()-based writer spliced lines in 10 of 10 runs

WRITER = f"""
import structlog
from relayd import logs
logs.setup("json", "info")
log = structlog.get_logger()
for i in range({LINES}):
    log.info("line.written", i=i)
"""


def test_two_processes_on_one_stderr_never_splice_lines() -> None:
    """Each record is one write, newline included: every line two writers leave parses."""
    read_end, write_end = os.pipe()
    try:
        procs = [
            subprocess.Popen([sys.executable, "-c", WRITER], stderr=write_end) for _ in range(2)
        ]
    finally:
        os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        lines = pipe.read().splitlines()
    for proc in procs:
        assert proc.wait(timeout=30) == 0
    spliced = []
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            spliced.append(line[:200])
    assert not spliced, f"{len(spliced)} spliced lines, e.g. {spliced[:2]}"
    assert len(lines) == 2 * LINES
