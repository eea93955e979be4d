"""The deployment proofs are scripts CI runs as root; here only that they parse and explain."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parent.parent / "scripts"


@pytest.mark.parametrize("name", ["container-proof", "systemd-proof"])
def test_proof_parses_and_its_help_names_the_summary_line(name):
    """`bash -n` accepts the script, and --help exits 0 describing its summary line."""
    script = SCRIPTS / name
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=10)
    assert done.returncode == 0
    assert f"{name}: N passed, M failed in S s" in done.stdout
