"""Reaching the provider: DNS and TCP connect, the TLS context, and the hints for each step.

upstream.Session runs the steps; this holds what they share and what `relayd check` shows: a
step's timing, the verified TLS context (built once, shared by every session), the peer
certificate's details, and the one-line hint an operator reads when a step fails.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import aiosmtplib

from relayd.config import UpstreamConfig
from relayd.errors import UpstreamError
from relayd.states import TlsMode

__all__ = [
    "StepTiming",
    "auth_hint",
    "connect_tcp",
    "describe",
    "refused",
    "tls_context",
    "tls_details",
    "tls_hint",
]


@dataclass(slots=True)
class StepTiming:
    step: str
    seconds: float
    detail: dict[str, Any] = field(default_factory=dict)


def tls_context(cfg: UpstreamConfig) -> ssl.SSLContext:
    """System trust store plus ca_file; hostname checks on unless verify is false.

    Built once per (ca_file and its mtime, verify) and shared by every session, because loading
    the system store is costly (docs/benchmarks.md#upstream-sessions).
    """
    mtime = os.stat(cfg.ca_file).st_mtime_ns if cfg.ca_file else 0
    return _tls_context(cfg.ca_file, mtime, cfg.verify)


@functools.lru_cache(maxsize=4)
def _tls_context(ca_file: str, mtime: int, verify: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def auth_hint(host: str, code: int | None, text: str) -> str:
    lower = host.lower()
    if "gmail" in lower or "google" in lower:
        return "Gmail needs an app password (Google account > Security > App passwords)"
    if "sendgrid" in lower:
        return "SendGrid expects username 'apikey' and an API key as the password"
    if "mailgun" in lower:
        return "Mailgun expects the domain's SMTP credentials, not the account login"
    if code == 534:
        return "the provider wants a different login method (app password or OAuth)"
    return "check upstream.username and the password (file); the provider refused them"


def tls_hint(cfg: UpstreamConfig, exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or str(exc)
        if "hostname" in why.lower() or "ip address mismatch" in why.lower():
            return f"the certificate is not for {cfg.host}: check upstream.host"
        return "certificate not trusted: add the issuing CA as upstream.ca_file"
    if isinstance(exc, ConnectionResetError | ConnectionAbortedError | EOFError) or (
        isinstance(exc, ssl.SSLError) and "WRONG_VERSION_NUMBER" in str(exc)
    ):
        if cfg.tls == TlsMode.IMPLICIT and cfg.port in (587, 25):
            return f"port {cfg.port} speaks plain SMTP first: use port 465 or tls: starttls"
        if cfg.tls == TlsMode.IMPLICIT:
            return "reset during the TLS handshake: is this port really implicit TLS (465)?"
        if cfg.tls == TlsMode.STARTTLS:
            return (
                "reset during the STARTTLS handshake (often a firewall or middlebox on "
                f"port {cfg.port}): try tls: implicit on port 465"
            )
    if isinstance(exc, TimeoutError):
        return (
            "no TLS answer in time: a firewall or middlebox, or a port that speaks plain SMTP "
            "first (587/25 want tls: starttls)"
        )
    return "TLS handshake failed: check upstream.port and upstream.tls"


def tls_details(smtp: aiosmtplib.SMTP) -> dict[str, Any]:
    """Protocol, cipher and the peer certificate's subject and expiry, for `relayd check`."""
    obj = smtp.get_transport_info("ssl_object")
    if not isinstance(obj, ssl.SSLObject | ssl.SSLSocket):
        return {}
    cert: dict[str, Any] = dict(obj.getpeercert() or {})
    subject = ", ".join(
        f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"
    )
    names = [v for kind, v in cert.get("subjectAltName", ()) if kind in ("DNS", "IP Address")]
    expires = cert.get("notAfter")
    return {
        "protocol": obj.version(),
        "cipher": (obj.cipher() or ("?",))[0],
        "subject": subject or ", ".join(names),
        "names": names,
        "expires_at": ssl.cert_time_to_seconds(str(expires)) if expires else None,
        "verified": obj.context.verify_mode == ssl.CERT_REQUIRED,
    }


def refused(
    what: str,
    step: str,
    exc: aiosmtplib.SMTPResponseException,
    temporary: bool = True,
    hint: str = "",
) -> UpstreamError:
    """The server answered with an error reply at a step: carry its code and words."""
    return UpstreamError(
        f"{what}: {exc.code} {exc.message}",
        step=step,
        temporary=temporary,
        code=exc.code,
        text=exc.message,
        hint=hint,
    )


def describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if isinstance(exc, OSError) else text


async def connect_tcp(cfg: UpstreamConfig, timings: list[StepTiming]) -> socket.socket:
    """Resolve, then connect to each address in turn; a step's failure as an UpstreamError."""
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    infos = await _resolve(cfg, loop)
    addrs = [str(info[4][0]) for info in infos]
    timings.append(StepTiming("dns", time.monotonic() - start, {"addresses": addrs}))
    start = time.monotonic()
    last: BaseException | None = None
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            async with asyncio.timeout(cfg.timeout):
                await loop.sock_connect(sock, addr)
            detail = {"address": f"{addr[0]!s}:{addr[1]!s}"}
            timings.append(StepTiming("connect", time.monotonic() - start, detail))
            return sock
        except (OSError, TimeoutError) as exc:
            sock.close()
            last = exc
    what = "timed out" if isinstance(last, TimeoutError) else str(last)
    raise UpstreamError(
        f"cannot connect to {cfg.host}:{cfg.port}: {what}",
        step="connect",
        temporary=True,
        hint="a firewall drops the port, or the port is wrong"
        if isinstance(last, TimeoutError)
        else "nothing listens there: check upstream.host and upstream.port",
    ) from last


async def _resolve(cfg: UpstreamConfig, loop: asyncio.AbstractEventLoop) -> list[Any]:
    try:
        async with asyncio.timeout(cfg.timeout):
            return await loop.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError) as exc:
        raise UpstreamError(
            f"cannot resolve {cfg.host}: {exc}",
            step="dns",
            temporary=True,
            hint="check upstream.host and DNS",
        ) from exc
