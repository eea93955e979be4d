"""A raw SMTP client for tests that must send bytes a client library refuses to send."""

from __future__ import annotations

import asyncio
import socket
from typing import Any


class Wire:
    """One SMTP connection spoken line by line: `await Wire.open(port)`, then `cmd(b"...")`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1", **kw: Any) -> Wire:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=1 << 20, **kw), 10
        )
        return cls(reader, writer)

    async def reply(self, timeout: float = 10.0) -> tuple[int, str]:
        """The next reply (all its lines): (code, text of the last line); (0, "") at EOF."""
        lines: list[bytes] = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                return 0, ""
            lines.append(line)
            if line[3:4] != b"-":
                break
        return int(lines[-1][:3]), lines[-1][4:].decode("utf-8", "replace").rstrip("\r\n")

    async def cmd(self, line: bytes, timeout: float = 10.0) -> tuple[int, str]:
        self.writer.write(line + b"\r\n")
        await self.writer.drain()
        return await self.reply(timeout)

    async def greet(self) -> None:
        """Read the banner and say EHLO; both must be 2xx."""
        code, text = await self.reply()
        assert code == 220, (code, text)
        code, text = await self.cmd(b"EHLO client.test")
        assert code == 250, (code, text)

    def close(self) -> None:
        self.writer.close()


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True
