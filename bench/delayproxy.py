"""A TCP proxy that models a far network for the benchmark: every byte arrives ONE_WAY ms
after it was sent, in each direction, so a round trip costs 2 x ONE_WAY and pipelined
commands still travel together (unlike sink.py --delay-ms, which delays each reply). TLS
passes through untouched, so its handshake pays real round trips too.

    python bench/delayproxy.py --target 127.0.0.1:PORT --one-way-ms 25

Prints ``port=N`` once listening on 127.0.0.1 (an ephemeral port). Loopback only; standard
library only; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import signal
import sys


def loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy reader -> writer, each chunk released `delay` seconds after it was read."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def release() -> None:
        while True:
            due, data = await queue.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    releaser = asyncio.create_task(release())
    try:
        while True:
            data = await reader.read(65536)
            queue.put_nowait((loop.time() + delay, data))
            if not data:
                break
        await releaser
    except OSError:
        releaser.cancel()
    finally:
        writer.close()


async def serve(target: str, delay: float) -> None:
    thost, tport = target.rsplit(":", 1)

    async def handle(creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        try:
            ureader, uwriter = await asyncio.open_connection(thost, int(tport))
        except OSError:
            cwriter.close()
            return
        await asyncio.gather(
            pump(creader, uwriter, delay), pump(ureader, cwriter, delay), return_exceptions=True
        )

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(f"port={server.sockets[0].getsockname()[1]}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--target", required=True, help="host:port to forward to (loopback)")
    ap.add_argument("--one-way-ms", type=float, default=25.0)
    opts = ap.parse_args()
    if not loopback(opts.target.rsplit(":", 1)[0]):
        sys.exit(f"delayproxy: refusing non-loopback target {opts.target}")
    asyncio.run(serve(opts.target, opts.one_way_ms / 1000.0))


if __name__ == "__main__":
    main()
