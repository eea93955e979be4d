"""A TLS upstream on 127.0.0.1 that offers PIPELINING and CHUNKING (each can be hidden) and
records what crossed the wire: every recv after login as it arrived (the grouping of the
client's writes), the command verbs in order, and each message with how it came (BDAT/DATA).

aiosmtpd has no BDAT, so this is a small asyncio protocol of its own; it answers strictly in
order, as RFC 2920 requires, and consumes a BDAT chunk's bytes whatever it replies (RFC 3030).
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from dataclasses import dataclass, field

from conftest import PASSWORD, USER


@dataclass
class Got:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes  # the message, unstuffed
    wire: bytes  # the body exactly as it crossed the connection
    how: str  # BDAT | DATA


@dataclass
class PipeServer:
    pipelining: bool = True
    chunking: bool = True
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    bdat_replies: list[str] = field(default_factory=list)  # answers to BDAT LAST, popped
    keep_refused: bool = False  # a refused BDAT leaves its transaction open (RFC 3030 is vague)
    split: bool = False  # every reply in two writes 10 ms apart: the client sees half a reply
    drop_at: int = 0  # abort the session instead of answering the drop_at-th body (once)
    recvs: list[bytes] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    messages: list[Got] = field(default_factory=list)
    sessions: int = 0
    bodies: int = 0
    port: int = 0
    server: asyncio.base_events.Server | None = None

    async def start(self, ctx: ssl.SSLContext) -> PipeServer:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Conn(self), "127.0.0.1", 0, ssl=ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()

    def with_mail(self) -> list[bytes]:
        return [r for r in self.recvs if b"MAIL FROM" in r]


class _Conn(asyncio.Protocol):
    def __init__(self, srv: PipeServer) -> None:
        self.srv = srv
        self.t: asyncio.Transport | None = None
        self.buf = bytearray()
        self.authed = False
        self.mail: str | None = None
        self.rcpts: list[str] = []
        self.body_left = -1  # bytes of a BDAT chunk still to read; -1: not in BDAT
        self.in_data = False
        self.nested = False  # the last MAIL was refused as nested: its RCPTs are refused too
        self.next_t = 0.0  # when the last scheduled piece of a split reply goes out

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.t = transport
        self.srv.sessions += 1
        self.say("220 pipe.test ESMTP")

    def say(self, line: str) -> None:
        data = line.encode() + b"\r\n"
        if not self.srv.split:
            return self.write(data)
        loop = asyncio.get_running_loop()
        self.next_t = max(self.next_t, loop.time())
        for part in (data[:2], data[2:]):
            self.next_t += 0.01
            loop.call_at(self.next_t, self.write, part)
        return None

    def write(self, data: bytes) -> None:
        if self.t is not None and not self.t.is_closing():
            self.t.write(data)

    def data_received(self, data: bytes) -> None:
        if self.authed:
            self.srv.recvs.append(data)
        self.buf += data
        while self.t is not None and not self.t.is_closing():
            if self.body_left >= 0:
                if len(self.buf) < self.body_left:
                    return
                chunk = bytes(self.buf[: self.body_left])
                del self.buf[: self.body_left]
                self.body_left = -1
                self.end_body(chunk, chunk, "BDAT")
            elif self.in_data:
                end = self.buf.find(b"\r\n.\r\n")
                if end < 0:
                    return
                wire = bytes(self.buf[: end + 2])
                del self.buf[: end + 5]
                self.in_data = False
                lines = wire.split(b"\r\n")
                data = b"\r\n".join(x[1:] if x.startswith(b".") else x for x in lines)
                self.end_body(data, wire + b".\r\n", "DATA")
            else:
                end = self.buf.find(b"\r\n")
                if end < 0:
                    return
                line = bytes(self.buf[:end]).decode("utf-8", "surrogateescape")
                del self.buf[: end + 2]
                self.command(line)

    def command(self, line: str) -> None:
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        self.srv.commands.append(verb)
        if verb == "EHLO":
            exts = ["pipe.test", "8BITMIME", "AUTH PLAIN"]
            exts += ["PIPELINING"] if self.srv.pipelining else []
            exts += ["CHUNKING"] if self.srv.chunking else []
            self.say("\r\n".join(f"250-{e}" for e in exts[:-1]) + f"\r\n250 {exts[-1]}")
        elif verb == "AUTH":
            parts = base64.b64decode(arg.split()[-1]).split(b"\0")
            self.authed = parts[1:] == [USER.encode(), PASSWORD.encode()]
            self.say("235 2.7.0 ok" if self.authed else "535 5.7.8 no")
        elif verb == "MAIL":
            self.nested = self.mail is not None
            if self.nested:
                return self.say("503 5.5.1 nested MAIL")
            self.mail = arg.partition(":")[2].split(">")[0].lstrip("<")
            self.say("250 2.1.0 ok")
        elif verb == "RCPT":
            address = arg.partition(":")[2].split(">")[0].lstrip("<")
            if self.mail is None or self.nested:
                return self.say("503 5.5.1 need MAIL")
            reply = self.srv.rcpt_replies.get(address, "250 2.1.5 ok")
            if reply.startswith("250"):
                self.rcpts.append(address)
            self.say(reply)
        elif verb == "DATA":
            if not self.rcpts:
                return self.say("554 5.5.1 no valid recipients")
            self.in_data = True
            self.say("354 go on")
        elif verb == "BDAT" and self.srv.chunking:
            self.body_left = int(arg.split()[0])
        elif verb == "RSET":
            self.mail, self.rcpts, self.nested = None, [], False
            self.say("250 2.0.0 ok")
        elif verb == "QUIT":
            self.say("221 2.0.0 bye")
            assert self.t is not None
            loop = asyncio.get_running_loop()
            loop.call_at(max(self.next_t, loop.time()) + 0.01, self.t.close)
        else:
            self.say("502 5.5.2 not here")

    def end_body(self, data: bytes, wire: bytes, how: str) -> None:
        if self.mail is None or not self.rcpts or self.nested:
            return self.say("503 5.5.1 no valid recipients")
        self.srv.bodies += 1
        if self.srv.bodies == self.srv.drop_at:
            assert self.t is not None
            self.t.abort()
            return None
        if how == "BDAT" and self.srv.bdat_replies:
            if not self.srv.keep_refused:
                self.mail, self.rcpts = None, []
            self.say(self.srv.bdat_replies.pop(0))
            return None
        self.srv.messages.append(Got(self.mail, self.rcpts, data, wire, how))
        self.mail, self.rcpts = None, []
        self.say("250 2.0.0 queued")
        return None
