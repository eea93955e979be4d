"""An unexpected error at start-up is one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

from conftest import free_port
from proc import run_cli, serve_env

from relayd.spool import Spool


async def test_an_unexpected_os_error_at_start_up_is_one_line_and_exit_1(tmp_path, pki):
    """relayd.lock is a directory (an OSError relayd does not expect): one line, exit 1."""
    spool = Spool(tmp_path / "spool")
    spool.create()
    (spool.root / "relayd.lock").mkdir()
    env = serve_env(spool.root, free_port(), pki.ca_file, log_format="console")
    code, _, err = await run_cli(env, "serve")
    lines = [line for line in err.splitlines() if not line.startswith("20")]  # log lines
    assert code == 1, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("relayd: "), err
    assert "relayd.lock" in lines[0] and "Is a directory" in lines[0]
