"""Command start-up benchmark: what one `relayd health` (a container's HEALTHCHECK) costs.

    python bench/cli.py [-n 11] [TREE ...]

Each TREE is a directory holding a relayd/ package (e.g. `git archive REV relayd | tar -x -C
DIR`); without one, this checkout. The trees run interleaved, round after round, so they see
the same machine load. Reported per tree: median wall and CPU (user + sys) of `relayd health`
(no daemon: it answers "down") and of `relayd health --help`, and `-X importtime`'s
cumulative time of relayd.cli. Compare trees as ratios from one run.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = (("health",), ("health", "--help"))


def timed(argv: list[str], env: dict[str, str], cwd: str) -> tuple[float, float]:
    """Wall and CPU seconds of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, env=env, cwd=cwd, capture_output=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, cpu


def import_seconds(env: dict[str, str], cwd: str) -> float:
    """-X importtime's cumulative seconds for relayd.cli under `relayd health --help`."""
    argv = [sys.executable, "-X", "importtime", "-m", "relayd", "health", "--help"]
    err = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True).stderr
    lines = [line for line in err.splitlines() if line.rstrip().endswith("| relayd.cli")]
    return int(lines[0].split("|")[1]) / 1e6 if lines else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=11, help="rounds (default 11)")
    parser.add_argument("trees", nargs="*", type=Path, help="directories holding relayd/")
    opts = parser.parse_args()
    trees = [t.resolve() for t in opts.trees] or [ROOT]
    results: dict[tuple[Path, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(opts.n):
            for tree in trees:
                env = dict(os.environ, PYTHONPATH=str(tree), RELAYD_SPOOL_PATH=f"{tmp}/spool")
                for cmd in COMMANDS:
                    wall, cpu = timed([sys.executable, "-m", "relayd", *cmd], env, tmp)
                    results.setdefault((tree, " ".join(cmd) + " wall"), []).append(wall)
                    results.setdefault((tree, " ".join(cmd) + " cpu"), []).append(cpu)
                results.setdefault((tree, "import relayd.cli"), []).append(import_seconds(env, tmp))
    for tree in trees:
        print(tree)
        for (where, what), values in results.items():
            if where == tree:
                print(f"  relayd {what:22} median {statistics.median(values):.3f} s")


if __name__ == "__main__":
    main()
