"""A fault-injecting implicit-TLS SMTP upstream: raw asyncio + ssl, scripted per test.

Unlike the aiosmtpd sink in conftest, this server owns every byte: it can reset TCP in the
middle of a TLS handshake, hang before the banner, drop the connection after 354, or present
a certificate for the wrong host. Each fault fires a given number of times and then the server
behaves, so a transient fault can be shown to end in delivery::

    fs = await FaultServer(pki).start()
    fs.fail("reset_in_handshake", times=2)   # first two sessions get an RST, then all is well
    fs.fail("data_552")                      # every DATA is refused for good

Session faults fire once per connection, DATA faults once per message. Anything that arrives
not starting with a TLS record (0x16) is kept in ``plaintext``: relayd must never send any.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import ssl
import struct
from dataclasses import dataclass, field
from typing import Any

from conftest import PASSWORD, USER, Pki

SESSION_FAULTS = (
    "close_on_connect",  # accept, then close before the handshake
    "reset_in_handshake",  # accept, read the ClientHello, then RST (SO_LINGER 0)
    "cert_wrong_host",  # a certificate from the trusted CA for another host name
    "cert_unknown_ca",  # a certificate for the right host from a CA nobody trusts
    "banner_hang",  # TLS up, then never a banner
    "banner_421",  # 421 instead of 220
    "ehlo_421",  # 421 to EHLO
    "auth_535",  # 535 to AUTH whatever the credentials
    "slow",  # every reply delayed by `slow_delay` seconds
)
DATA_FAULTS = (
    "data_451",  # 451 after the final dot
    "data_552",  # 552 after the final dot
    "data_hang",  # 354, then silence
    "data_drop",  # 354, read a line, then RST
)


@dataclass
class Got:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes  # unstuffed, as the message
    wire: bytes  # the DATA section exactly as it crossed the connection
    login: str


@dataclass
class _Txn:
    mail_from: str = ""
    rcpt_tos: list[str] = field(default_factory=list)
    delay: float = 0.0
    login: str = ""
    auth_fault: bool | None = None  # decided at the first AUTH: clients try several mechanisms


class FaultServer:
    """A scripted upstream on 127.0.0.1; `port` is set by start()."""

    def __init__(self, pki: Pki, user: str = USER, password: str = PASSWORD) -> None:
        self.ctx = pki.server_ctx
        self.wrong_host_ctx = _server_ctx(pki.ca.issue_cert("mail.other.example"))
        import trustme

        self.unknown_ca_ctx = _server_ctx(trustme.CA().issue_cert("127.0.0.1", "localhost"))
        self.user, self.password = user, password
        self.auth_mechanisms = "PLAIN LOGIN"
        self.pipelining = False  # offer PIPELINING: commands are answered in order anyway
        self.slow_delay = 0.0
        self.faults: dict[str, int | None] = {}
        self.fired: dict[str, int] = {}
        self.rcpt_replies: dict[str, str] = {}
        self.messages: list[Got] = []
        self.plaintext: list[bytes] = []
        self.commands: list[str] = []
        self.sessions = 0
        self.tls_sessions = 0
        self.active = 0  # connections currently open
        self.open_txns: set[int] = set()  # transactions between MAIL and the reply to DATA
        self.port = 0
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- scripting ------------------------------------------------------------------------

    def fail(self, kind: str, times: int | None = None) -> FaultServer:
        """Inject `kind` the next `times` times it could apply (None: for ever)."""
        assert kind in SESSION_FAULTS + DATA_FAULTS, kind
        self.faults[kind] = times
        return self

    def _fire(self, kind: str) -> bool:
        if kind not in self.faults:
            return False
        left = self.faults[kind]
        if left is not None:
            if left <= 0:
                return False
            self.faults[kind] = left - 1
        self.fired[kind] = self.fired.get(kind, 0) + 1
        return True

    # -- life cycle -----------------------------------------------------------------------

    async def start(self, port: int = 0) -> FaultServer:
        """Listen on 127.0.0.1:port (0: any free port, read back into self.port)."""
        sock = socket.socket()
        sock.bind(("127.0.0.1", port))
        sock.listen(512)
        sock.setblocking(False)
        self._listener = sock
        self.port = sock.getsockname()[1]
        self._spawn(self._accept())
        return self

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def __aenter__(self) -> FaultServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            conn.setblocking(False)
            self._spawn(self._session(conn))

    # -- one connection -------------------------------------------------------------------

    async def _session(self, sock: socket.socket) -> None:
        self.sessions += 1
        self.active += 1
        writer: asyncio.StreamWriter | None = None
        txn = _Txn(delay=0.0)
        try:
            if self._fire("close_on_connect"):
                return
            if not await _readable(sock, 10.0):
                return
            if self._fire("reset_in_handshake"):
                _reset(sock)
                return
            if sock.recv(1, socket.MSG_PEEK) != b"\x16":
                self.plaintext.append(sock.recv(65536))
                return
            ctx = self.ctx
            if self._fire("cert_wrong_host"):
                ctx = self.wrong_host_ctx
            elif self._fire("cert_unknown_ca"):
                ctx = self.unknown_ca_ctx
            reader, writer = await _tls(sock, ctx)
            self.tls_sessions += 1
            await self._dialogue(reader, writer, txn)
        except (OSError, ssl.SSLError, EOFError, asyncio.IncompleteReadError):
            pass
        finally:
            self.active -= 1
            self.open_txns.discard(id(txn))
            if writer is not None:
                writer.transport.abort()
            else:
                sock.close()

    async def _dialogue(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, txn: _Txn
    ) -> None:
        txn.delay = self.slow_delay if self._fire("slow") else 0.0
        if self._fire("banner_hang"):
            await reader.read()
            return
        if self._fire("banner_421"):
            await _reply(writer, txn, "421 4.3.2 fault: not now")
            return
        await _reply(writer, txn, "220 fault.test ESMTP")
        while True:
            line = await reader.readline()
            if not line:
                return
            verb, _, arg = line.rstrip(b"\r\n").decode("utf-8", "replace").partition(" ")
            verb = verb.upper()
            self.commands.append(verb)
            command = getattr(self, f"_cmd_{verb.lower()}", None)
            if command is None:
                await _reply(writer, txn, "500 5.5.2 unknown command")
            elif await command(reader, writer, txn, arg) is False:
                return

    async def _cmd_ehlo(self, r: Any, w: asyncio.StreamWriter, txn: _Txn, arg: str) -> bool:
        if self._fire("ehlo_421"):
            await _reply(w, txn, "421 4.3.2 fault: busy")
            return False
        exts = ["fault.test", "SIZE 104857600", "8BITMIME", f"AUTH {self.auth_mechanisms}"]
        exts[1:1] = ["PIPELINING"] if self.pipelining else []
        await _reply(w, txn, "\r\n".join(f"250-{e}" for e in exts[:-1]) + f"\r\n250 {exts[-1]}")
        return True

    async def _cmd_auth(self, r: Any, w: asyncio.StreamWriter, txn: _Txn, arg: str) -> bool:
        if txn.auth_fault is None:
            txn.auth_fault = self._fire("auth_535")
        if txn.auth_fault:
            await _reply(w, txn, "535 5.7.8 fault: authentication credentials invalid")
            return True
        mech, _, initial = arg.partition(" ")
        if mech.upper() == "PLAIN":
            blob = initial or await _challenge(r, w, txn, "")
            _, user, password = _b64(blob).split("\0", 2)
        else:
            user = _b64(initial or await _challenge(r, w, txn, "VXNlcm5hbWU6"))
            password = _b64(await _challenge(r, w, txn, "UGFzc3dvcmQ6"))
        if (user, password) != (self.user, self.password):
            await _reply(w, txn, "535 5.7.8 authentication credentials invalid")
            return True
        txn.login = user
        await _reply(w, txn, "235 2.7.0 Authentication successful")
        return True

    async def _cmd_mail(self, r: Any, w: asyncio.StreamWriter, txn: _Txn, arg: str) -> bool:
        txn.mail_from, txn.rcpt_tos = _address(arg), []
        self.open_txns.add(id(txn))
        await _reply(w, txn, "250 2.1.0 Ok")
        return True

    async def _cmd_rcpt(self, r: Any, w: asyncio.StreamWriter, txn: _Txn, arg: str) -> bool:
        address = _address(arg)
        if address in self.rcpt_replies:
            await _reply(w, txn, self.rcpt_replies[address])
            return True
        txn.rcpt_tos.append(address)
        await _reply(w, txn, "250 2.1.5 Ok")
        return True

    async def _cmd_data(
        self, r: asyncio.StreamReader, w: asyncio.StreamWriter, txn: _Txn, arg: str
    ) -> bool:
        if not txn.rcpt_tos:
            await _reply(w, txn, "554 5.5.1 no valid recipients")
            return True
        await _reply(w, txn, "354 End data with <CR><LF>.<CR><LF>")
        if self._fire("data_hang"):
            await r.read()
            return False
        if self._fire("data_drop"):
            await r.readline()
            _linger0(w.get_extra_info("socket"))
            w.transport.abort()
            return False
        wire = await r.readuntil(b"\r\n.\r\n")
        if self._fire("data_451"):
            await _reply(w, txn, "451 4.3.0 fault: try again later")
        elif self._fire("data_552"):
            await _reply(w, txn, "552 5.3.4 fault: message too big for this mailbox")
        else:
            body = b"\r\n".join(
                line[1:] if line.startswith(b".") else line
                for line in wire[: -len(b".\r\n")].split(b"\r\n")
            )
            self.messages.append(Got(txn.mail_from, list(txn.rcpt_tos), body, wire, txn.login))
            await _reply(w, txn, "250 2.0.0 Ok: queued")
        txn.mail_from, txn.rcpt_tos = "", []
        self.open_txns.discard(id(txn))
        return True

    async def _cmd_rset(self, r: Any, w: asyncio.StreamWriter, txn: _Txn, arg: str) -> bool:
        txn.mail_from, txn.rcpt_tos = "", []
        self.open_txns.discard(id(txn))
        await _reply(w, txn, "250 2.0.0 Ok")
        return True

    async def _cmd_noop(self, r: Any, w: asyncio.StreamWriter, txn: _Txn, arg: str) -> bool:
        await _reply(w, txn, "250 2.0.0 Ok")
        return True

    async def _cmd_quit(self, r: Any, w: asyncio.StreamWriter, txn: _Txn, arg: str) -> bool:
        await _reply(w, txn, "221 2.0.0 Bye")
        return False

    def received(self, header: bytes) -> list[bytes]:
        """The value of `header` in each received message, in order of arrival."""
        out = []
        for got in self.messages:
            for line in got.data.split(b"\r\n"):
                if line.lower().startswith(header.lower() + b":"):
                    out.append(line.split(b":", 1)[1].strip())
                    break
        return out


def _server_ctx(cert: Any) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    return ctx


async def _readable(sock: socket.socket, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(sock.fileno(), lambda: ready.done() or ready.set_result(True))
    try:
        async with asyncio.timeout(timeout):
            await ready
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(sock.fileno())


def _linger0(sock: Any) -> None:
    """With SO_LINGER 0 a close makes the kernel send RST instead of FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _reset(sock: socket.socket) -> None:
    _linger0(sock)
    sock.close()


async def _tls(
    sock: socket.socket, ctx: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    protocol = asyncio.StreamReaderProtocol(reader)
    transport, _ = await loop.connect_accepted_socket(
        lambda: protocol, sock, ssl=ctx, ssl_handshake_timeout=10
    )
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


async def _reply(w: asyncio.StreamWriter, txn: _Txn, text: str) -> None:
    if txn.delay:
        await asyncio.sleep(txn.delay)  # the fault itself: a slow server
    w.write(text.encode() + b"\r\n")
    await w.drain()


async def _challenge(r: asyncio.StreamReader, w: asyncio.StreamWriter, txn: _Txn, c: str) -> str:
    await _reply(w, txn, f"334 {c}")
    return (await r.readline()).decode().strip()


def _b64(text: str) -> str:
    return base64.b64decode(text).decode("utf-8", "replace")


def _address(arg: str) -> str:
    start, end = arg.find("<"), arg.find(">")
    return arg[start + 1 : end] if 0 <= start < end else arg.partition(":")[2].strip()
