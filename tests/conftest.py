"""Shared fixtures: a real TLS upstream (aiosmtpd behind a trustme CA), an in-process daemon,
an SMTP client, and a deadline-bound poll helper. Everything runs on 127.0.0.1, port 0."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme
from aiosmtpd.smtp import SMTP, AuthResult

from relayd import config as config_mod
from relayd.app import Daemon
from relayd.config import Config

USER, PASSWORD = "app@example.com", "s3cret-Pa55word!"
SUBMITTER, SUBMITTER_PASSWORD = "webapp", "subm1tter-Secret!"
# A second provider account, for tests with several upstreams.
USER2, PASSWORD2 = "billing@example.net", "an0ther-Pr0vider-Key!"


def forms(user: str, password: str) -> list[str]:
    """The password and what it looks like inside AUTH PLAIN and AUTH LOGIN."""
    b64 = base64.b64encode
    return [
        password,
        b64(password.encode()).decode(),
        b64(b"\0" + user.encode() + b"\0" + password.encode()).decode(),
        b64(user.encode() + b"\0" + user.encode() + b"\0" + password.encode()).decode(),
    ]


def bearer_forms(user: str, token: str) -> list[str]:
    """An OAuth secret raw and base64, and a token inside the XOAUTH2 and OAUTHBEARER strings."""
    b64 = base64.b64encode
    return [
        token,
        b64(token.encode()).decode(),
        b64(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode(),
        b64(f"n,a={user},\x01auth=Bearer {token}\x01\x01".encode()).decode(),
    ]


# The test OAuth provider's client secret and first refresh token (tests/oauthfake.py); every
# access and refresh token it issues later is appended here as it is handed out.
OAUTH_CLIENT_SECRET, OAUTH_FIRST_REFRESH = "cl1ent-Secret-xyz", "rt-first-0123456789"
REDIS_PASSWORD = "r3dis-Fleet-Secret!"  # tests/redisproc.py's requirepass, pacing.redis_password
SECRET_FORMS = [
    REDIS_PASSWORD,
    *forms(USER, PASSWORD),
    *forms(SUBMITTER, SUBMITTER_PASSWORD),
    *bearer_forms(USER, OAUTH_CLIENT_SECRET),
    *bearer_forms(USER, OAUTH_FIRST_REFRESH),
    *forms(USER2, PASSWORD2),
]


@pytest.fixture(autouse=True, scope="session")
def _no_daemon_outlives_the_suite() -> Any:
    """Kill any `relayd serve` a failed test left running (its delivery process follows)."""
    yield
    import os
    import signal

    from proc import STARTED

    for proc in STARTED:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Every test, every phase: no secret in what it captured (stdout, stderr, log records)
    nor in any line a `relayd serve` subprocess wrote. This runs over the whole suite, the
    fault, crash and hostile-client tests included, with subprocess daemons at debug."""
    from proc import CAPTURED

    outcome = yield
    report = outcome.get_result()
    text = "\n".join(content for _, content in report.sections) + "\n".join(CAPTURED)
    CAPTURED.clear()
    leaked = [s for s in SECRET_FORMS if s in text]
    if leaked and not report.failed:
        report.outcome = "failed"
        report.longrepr = f"a secret appeared in captured output ({len(leaked)} form(s))"


async def eventually(pred: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll pred (a function or a coroutine function) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}")
        await asyncio.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def taken_port() -> Iterator[int]:
    """A loopback port something else listens on, for as long as the block runs."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield int(busy.getsockname()[1])


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    login: str | None
    at: float = 0.0  # time.monotonic() of the 250 to DATA
    tls: bool = False  # the session was encrypted (implicit TLS or after STARTTLS)


@dataclass
class Sink:
    """A scriptable upstream: what it received and what it should answer next."""

    messages: list[Received] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)
    auth_failures: int = 0
    mail_commands: int = 0
    password: str = PASSWORD
    user: str = USER
    peak: int = 0  # most sessions open at once, sampled at each MAIL
    data_replies: list[str] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    sessions: int = 0
    connected_at: list[float] = field(default_factory=list)  # time.monotonic() of each session
    # The reply to a refused AUTH (default: aiosmtpd's 535). Not named auth_*: aiosmtpd takes
    # every auth_<NAME> attribute of its handler for an AUTH mechanism it offers.
    refused_auth_reply: str = ""
    protocols: list[Any] = field(default_factory=list)
    port: int = 0
    server: asyncio.base_events.Server | None = None

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self.mail_commands += 1
        open_now = sum(
            1 for p in self.protocols if p.transport is not None and not p.transport.is_closing()
        )
        self.peak = max(self.peak, open_now)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_replies:
            return self.data_replies.pop(0)
        login = (
            session.auth_data.decode()
            if isinstance(session.auth_data, bytes)
            else (session.auth_data)
        )
        self.messages.append(
            Received(
                envelope.mail_from,
                list(envelope.rcpt_tos),
                envelope.original_content,
                login,
                time.monotonic(),
                session.ssl is not None,
            )
        )
        return "250 2.0.0 queued upstream"

    def authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = auth_data.login.decode() == self.user and auth_data.password.decode() == self.password
        if ok:
            self.logins.append(auth_data.login.decode())
            return AuthResult(success=True, auth_data=auth_data.login)
        self.auth_failures += 1
        return AuthResult(success=False, handled=False, message=self.refused_auth_reply or None)


@dataclass
class Pki:
    ca: trustme.CA
    ca_file: Path
    server_ctx: ssl.SSLContext


def make_pki(tmp: Path, *names: str) -> Pki:
    ca = trustme.CA()
    cert = ca.issue_cert(*names)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    ca_file = tmp / f"ca-{id(ca)}.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return Pki(ca, ca_file, ctx)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path, "127.0.0.1", "localhost")


async def start_sink(
    sink: Sink,
    ssl_ctx: ssl.SSLContext | None,
    port: int = 0,
    starttls_ctx: ssl.SSLContext | None = None,
) -> Sink:
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        sink.sessions += 1
        sink.connected_at.append(time.monotonic())
        proto = SMTP(
            sink,
            hostname="upstream.test",
            authenticator=sink.authenticate,
            auth_require_tls=False,
            auth_required=True,
            tls_context=starttls_ctx,
            require_starttls=False,
        )
        sink.protocols.append(proto)
        return proto

    sink.server = await loop.create_server(factory, "127.0.0.1", port, ssl=ssl_ctx)
    sink.port = sink.server.sockets[0].getsockname()[1]
    return sink


def drop_sessions(sink: Sink) -> None:
    """Close every session server-side, as a provider does with idle connections."""
    for proto in sink.protocols:
        if proto.transport is not None:
            proto.transport.close()


async def stop_sink(sink: Sink) -> None:
    if sink.server is not None:
        sink.server.close()
        sink.server = None


@pytest.fixture
async def sink(pki: Pki) -> AsyncIterator[Sink]:
    s = await start_sink(Sink(), pki.server_ctx)
    yield s
    await stop_sink(s)


def make_config(tmp_path: Path, port: int, ca_file: Path | None, **env: Any) -> Config:
    """A Config built the way operators build one: through RELAYD_* variables."""
    environ = {
        "RELAYD_LISTEN_PORT": "0",
        "RELAYD_SPOOL_PATH": str(tmp_path / "spool"),
        "RELAYD_UPSTREAM_HOST": "127.0.0.1",
        "RELAYD_UPSTREAM_PORT": str(port),
        "RELAYD_UPSTREAM_USERNAME": USER,
        "RELAYD_UPSTREAM_PASSWORD": PASSWORD,
        "RELAYD_UPSTREAM_TIMEOUT": "5",
        "RELAYD_RETRY_INITIAL_DELAY": "0.05",
        "RELAYD_RETRY_MAX_DELAY": "0.4",
        # In-process tests assert the relay's own log lines; subprocess tests use the default.
        "RELAYD_RELAY_SEPARATE_PROCESS": "false",
    }
    if ca_file is not None:
        environ["RELAYD_UPSTREAM_CA_FILE"] = str(ca_file)
    environ.update({f"RELAYD_{k.upper()}": str(v) for k, v in env.items()})
    return config_mod.load(None, environ)


@contextlib.asynccontextmanager
async def running(cfg: Config, dev: bool = False) -> AsyncIterator[Daemon]:
    daemon = Daemon(cfg, None, dev, {}, signals=False)
    task = asyncio.create_task(daemon.run())
    started = asyncio.create_task(daemon.started.wait())
    done, _ = await asyncio.wait({task, started}, timeout=10, return_when="FIRST_COMPLETED")
    if task in done:
        task.result()
    assert started in done, "daemon did not start"
    try:
        yield daemon
    finally:
        daemon.stop.set()
        await asyncio.wait_for(task, 30)


async def submit(port: int, mail_from: str, rcpts: list[str], data: bytes) -> tuple[int, str]:
    """Send one message over plain SMTP to the listener; returns the reply to DATA."""
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=port, start_tls=False, local_hostname="client.test", timeout=10
    )
    await client.connect()
    try:
        await client.ehlo()
        await client.mail(mail_from)
        for r in rcpts:
            await client.rcpt(r)
        try:
            reply = await client.data(data)
        except aiosmtplib.SMTPResponseException as exc:
            return exc.code, exc.message
        return reply.code, reply.message
    finally:
        client.close()


def message(subject: str = "hello", body: str = "Hi there.\r\n") -> bytes:
    return (
        f"From: app@example.com\r\nTo: user@example.org\r\nSubject: {subject}\r\n"
        f"Date: Mon, 30 Nov 2026 05:00:00 +0000\r\nMessage-ID: <{subject}@example.com>\r\n"
        f"\r\n{body}"
    ).encode()


def queue_files(cfg: Config, state: str = "queue") -> list[str]:
    d = Path(cfg.spool.path) / state
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def _redis(tmp_path: Path, password: str = "") -> Iterator[Any]:
    import redisproc

    if redisproc.binary() is None:
        if redisproc.required():
            pytest.fail(f"RELAYD_REQUIRE_REDIS=1 but {redisproc.INSTALL}")
        pytest.skip(redisproc.INSTALL)
    server = redisproc.RedisServer(tmp_path, password=password).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Any]:
    """A real redis-server on a free port (skipped, or failed in CI, when it is absent)."""
    yield from _redis(tmp_path)


@pytest.fixture
def redis_with_password(tmp_path: Path) -> Iterator[Any]:
    """The same, with requirepass REDIS_PASSWORD."""
    yield from _redis(tmp_path, REDIS_PASSWORD)
