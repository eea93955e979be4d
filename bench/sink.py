"""A counting upstream for the benchmark: implicit TLS, AUTH required (any credentials).

Run by bench/run.py as a subprocess so it does not share an interpreter with the load:

    python bench/sink.py --cert CERT --key KEY [--delay-ms 0] [--arrivals FILE] [--no-chunking]

It prints ``port=N`` once listening, then answers every line on stdin with one JSON line of
counters (messages, bytes, logins, sessions, peak concurrent sessions). It reads DATA by
searching the buffer for the terminating dot, not line by line, so it stays far cheaper than
the relay under test. With --arrivals it appends the wall-clock time of each accepted message
to FILE, one per line (bench/pacing.py checks the pacing on it). It offers PIPELINING and
CHUNKING (BDAT, RFC 3030), as Gmail and Microsoft 365 do; ``--no-chunking`` hides CHUNKING.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time
from typing import IO

ARRIVALS: list[IO[str]] = []
STATS = {"messages": 0, "bytes": 0, "logins": 0, "sessions": 0, "active": 0, "peak_active": 0}


async def reply(writer: asyncio.StreamWriter, text: bytes, delay: float) -> None:
    if delay:
        await asyncio.sleep(delay)
    writer.write(text + b"\r\n")


async def session(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float, chunking: bool
) -> None:
    STATS["sessions"] += 1
    STATS["active"] += 1
    STATS["peak_active"] = max(STATS["peak_active"], STATS["active"])
    authed = False
    try:
        await reply(writer, b"220 sink.bench ESMTP", delay)
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                chunk = b"250-CHUNKING\r\n" if chunking else b""
                await reply(
                    writer,
                    b"250-sink.bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                    + chunk
                    + b"250 AUTH PLAIN",
                    delay,
                )
            elif verb == b"AUTH":
                authed = True
                STATS["logins"] += 1
                await reply(writer, b"235 2.7.0 Authentication successful", delay)
            elif verb == b"MAIL":
                await reply(
                    writer, b"250 OK" if authed else b"530 5.7.0 Authentication required", delay
                )
            elif verb in (b"RCPT", b"RSET", b"NOOP"):
                await reply(writer, b"250 OK", delay)
            elif verb == b"DATA":
                await reply(writer, b"354 go ahead", delay)
                body = await reader.readuntil(b"\r\n.\r\n")
                STATS["messages"] += 1
                STATS["bytes"] += len(body)
                for fh in ARRIVALS:
                    fh.write(f"{time.time():.6f}\n")
                    fh.flush()
                await reply(writer, b"250 2.0.0 queued", delay)
            elif verb == b"BDAT" and chunking:
                size, *last = line[5:].split()
                body = await reader.readexactly(int(size))
                if last:
                    STATS["messages"] += 1
                    for fh in ARRIVALS:
                        fh.write(f"{time.time():.6f}\n")
                        fh.flush()
                STATS["bytes"] += len(body)
                await reply(writer, b"250 2.0.0 queued" if last else b"250 2.0.0 chunk ok", delay)
            elif verb == b"QUIT":
                await reply(writer, b"221 bye", delay)
                break
            else:
                await reply(writer, b"502 5.5.2 not implemented", delay)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        pass
    finally:
        STATS["active"] -= 1
        writer.close()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--arrivals", default="", help="append each message's arrival time here")
    ap.add_argument("--no-chunking", action="store_true", help="do not offer CHUNKING (BDAT)")
    opts = ap.parse_args()
    if opts.arrivals:
        ARRIVALS.append(open(opts.arrivals, "a", encoding="ascii"))  # noqa: ASYNC230, SIM115 - once, before serving
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(opts.cert, opts.key)
    delay = opts.delay_ms / 1000.0
    server = await asyncio.start_server(
        lambda r, w: session(r, w, delay, not opts.no_chunking),
        "127.0.0.1",
        0,
        ssl=ctx,
        limit=64 * 1024 * 1024,
    )
    print(f"port={server.sockets[0].getsockname()[1]}", flush=True)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    while await stdin.readline():
        print(json.dumps(STATS), flush=True)
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
