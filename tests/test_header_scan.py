"""A 25 MiB message with no blank line: the header block is the whole message, so the scan
for a missing Date/Message-ID must be bounded and off the event loop.

Measured from outside on a real `relayd serve`: the peak memory of the listener process
(VmHWM) and the longest NOOP round trip of a second client while the message is taken in.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from conftest import free_port
from proc import ServeProcess, serve_env
from rawsmtp import Wire

MiB = 1 << 20
LINE = b"a:b\r\n"  # the shortest header lines: the most of them in 25 MiB


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


async def probe(port: int, stop: asyncio.Event, lags: list[float]) -> None:
    """NOOP after NOOP on a second session; each round trip is how long the loop was busy."""
    wire = await Wire.open(port)
    try:
        await wire.greet()
        while not stop.is_set():
            start = time.monotonic()
            code, _ = await wire.cmd(b"NOOP", timeout=30)
            assert code == 250
            lags.append(time.monotonic() - start)
            await asyncio.sleep(0.005)
    finally:
        wire.close()


async def offer(port: int, body: bytes) -> tuple[int, str]:
    wire = await Wire.open(port)
    try:
        await wire.greet()
        assert (await wire.cmd(b"MAIL FROM:<app@example.com>"))[0] == 250
        assert (await wire.cmd(b"RCPT TO:<u@example.org>"))[0] == 250
        assert (await wire.cmd(b"DATA"))[0] == 354
        wire.writer.write(body)
        return await wire.cmd(b".", timeout=60)
    finally:
        wire.close()


async def test_a_25_mib_header_block_neither_stalls_the_loop_nor_balloons(tmp_path, pki):
    """No blank line in 25 MiB: Date and Message-ID still added (250); the listener's peak
    memory grows by less than twice the message (it is held once, as received); no NOOP of
    another session waits 0.5 s. Before: +331 MiB and 6.8 s (a list of every line, and a
    regex tried at every line start, on the loop); now about +25 MiB and 0.05 s."""
    spool = tmp_path / "spool"
    env = serve_env(spool, free_port(), pki.ca_file, log_level="info")
    proc = await ServeProcess(env).start()
    try:
        assert proc.proc is not None
        body = LINE * ((25 * MiB - 4096) // len(LINE))
        before = status_kib(proc.proc.pid, "VmRSS")
        stop, lags = asyncio.Event(), []
        prober = asyncio.create_task(probe(proc.port, stop, lags))
        code, text = await offer(proc.port, body)
        stop.set()
        await prober
        assert code == 250, (code, text)
        grew = (status_kib(proc.proc.pid, "VmHWM") - before) * 1024
        assert grew < 2 * len(body), f"peak grew {grew / MiB:.0f} MiB"
        assert max(lags) < 0.5, f"longest NOOP round trip {max(lags):.2f} s"
        stored = next((spool / "queue").glob("*.eml")).read_bytes()
        head = stored[stored.index(b"\n") + 1 :][:300]  # past the envelope line
        assert head.startswith(b"Date: ") and b"\r\nMessage-ID: <" in head
        assert LINE in head  # then the message as it came
    finally:
        assert await proc.stop() == 0
