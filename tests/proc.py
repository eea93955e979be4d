"""`relayd serve` as a real subprocess: start, read its JSON log lines, signal, kill."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Every line any `relayd serve` subprocess wrote, for conftest's secret check.
CAPTURED: list[str] = []
# Every subprocess started, so a session-end fixture can kill whatever a failed test left.
STARTED: list[asyncio.subprocess.Process] = []


class ServeProcess:
    def __init__(
        self,
        env: dict[str, str],
        args: list[str] | None = None,
        preexec: Callable[[], None] | None = None,
        prefix: list[str] | None = None,
        python: str = sys.executable,
    ) -> None:
        self.env = {**os.environ, **env, "RELAYD_LOG_FORMAT": "json"}
        self.args = args or []
        # Run in the child before exec (e.g. resource limits); a command the daemon is run
        # under (e.g. unshare or setpriv), which must exec it in the same process.
        self.preexec = preexec
        self.prefix = prefix or []
        self.python = python  # another user may not reach this venv's interpreter
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self.port = 0
        self._reader: asyncio.Task[None] | None = None
        self._started = asyncio.Event()

    async def start(self, timeout: float = 30.0) -> ServeProcess:
        self._started = asyncio.Event()
        self.proc = await asyncio.create_subprocess_exec(
            *self.prefix,
            self.python,
            "-m",
            "relayd",
            "serve",
            *self.args,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=self.preexec,
            limit=1 << 24,  # a log line can carry a long provider reply
        )
        STARTED.append(self.proc)
        self._reader = asyncio.create_task(self._read(self.proc))
        waiter = asyncio.create_task(self._started.wait())
        done, _ = await asyncio.wait(
            {waiter, self._reader}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if waiter not in done:
            waiter.cancel()
            if self._reader not in done:  # still running: never leave a daemon behind
                self.proc.kill()
            await self.proc.wait()
            raise AssertionError("relayd serve did not start:\n" + "\n".join(self.raw[-20:]))
        return self

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            text = raw.decode(errors="replace").rstrip("\n")
            self.raw.append(text)
            CAPTURED.append(text)
            try:
                line = json.loads(text)
            except ValueError:
                continue
            self.lines.append(line)
            if line.get("event") == "server.started":
                self.port = int(line["port"])
                self._started.set()

    async def expect_exit(self, timeout: float = 10.0) -> int:
        """Start a daemon that should refuse to start; returns its exit code."""
        with contextlib.suppress(AssertionError):  # it exits instead of logging server.started
            await self.start(timeout=timeout)
        return await self.wait()

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("event") == name]

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)
        return code

    async def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        await self.wait()

    async def stop(self) -> int:
        if self.proc is None or self.proc.returncode is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        try:
            return await self.wait()
        except TimeoutError:
            self.signal(signal.SIGKILL)  # never leave a daemon behind a failed test
            await self.wait()
            raise AssertionError("relayd serve did not stop on SIGTERM") from None


def alive(pid: int) -> bool:
    """Whether a process still runs (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split()[2] != "Z"


def serve_env(spool: Path, upstream_port: int, ca_file: Path, **extra: str) -> dict[str, str]:
    from conftest import PASSWORD, USER

    env = {
        "RELAYD_LISTEN_PORT": "0",
        "RELAYD_SPOOL_PATH": str(spool),
        "RELAYD_UPSTREAM_HOST": "127.0.0.1",
        "RELAYD_UPSTREAM_PORT": str(upstream_port),
        "RELAYD_UPSTREAM_CA_FILE": str(ca_file),
        "RELAYD_UPSTREAM_USERNAME": USER,
        "RELAYD_UPSTREAM_PASSWORD": PASSWORD,
        "RELAYD_UPSTREAM_TIMEOUT": "5",
        "RELAYD_RETRY_INITIAL_DELAY": "0.05",
        "RELAYD_RETRY_MAX_DELAY": "0.3",
        # Debug everywhere: the suite-wide secret check (conftest) then sees the most output.
        "RELAYD_LOG_LEVEL": "debug",
    }
    env.update({f"RELAYD_{k.upper()}": v for k, v in extra.items()})
    return env


async def run_cli(
    env: dict[str, str],
    *args: str,
    prefix: list[str] | None = None,
    python: str = sys.executable,
    stdin: bytes = b"",
) -> tuple[int, str, str]:
    """Run `relayd ARGS` to completion; returns (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *(prefix or []),
        python,
        "-m",
        "relayd",
        *args,
        env={**os.environ, **env},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    CAPTURED.extend([out.decode(errors="replace"), err.decode(errors="replace")])
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
