"""`relayd check [--to ADDR]`: walk the configured upstream step by step and say what broke.

Each step (dns, connect, tls, ehlo, auth, and with --to a real message) is timed by
upstream.Session; a failure names its step, the server's words and a hint. Every printed
line passes through logs.redact, so the password cannot appear even inside a server reply.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import socket
import time
from typing import Any

from relayd import fences, logs
from relayd.cli.common import load_config, say
from relayd.config import Config, UpstreamConfig
from relayd.errors import ConfigError, UpstreamError
from relayd.states import OutcomeStatus
from relayd.upstream import Session, StepTiming


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("check", parents=[common], help="diagnose each upstream step by step")
    p.add_argument("name", nargs="?", help="only the upstream of this name (default: every one)")
    p.add_argument("--to", metavar="ADDR", help="also send a real test message to ADDR")
    p.add_argument("--from", dest="mail_from", metavar="ADDR", help="sender for --to")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    ups = [u for u in cfg.upstreams if args.name in (None, u.name)]
    if not ups:
        known = ", ".join(u.name for u in cfg.upstreams)
        say(f"relayd check: no upstream is called {args.name!r} (configured: {known})")
        return 2
    if not ups[0].host:
        raise ConfigError("upstream.host", "required for relayd check")
    for up in cfg.upstreams:
        logs.add_auth_forms(up.username, up.password)
    # As serve does: never diagnose with a library relayd cannot use.
    for note in asyncio.run(fences.check()):
        say(f"note: {note}")
    return asyncio.run(_check_all(cfg, ups, args.to, args.mail_from))


async def _check_all(
    cfg: Config, ups: list[UpstreamConfig], to: str | None, mail_from: str | None
) -> int:
    """One block per upstream, in config order; 1 when any of them failed."""
    named = len(cfg.upstreams) > 1 or cfg.upstreams[0].name != "default"
    code = 0
    for i, up in enumerate(ups):
        if i:
            say()
        verify = "on" if up.verify else "OFF (any certificate is accepted)"
        label = f"{up.name}: " if named else ""
        preset = f", preset: {up.preset}" if up.preset else ""
        say(f"checking {label}{up.host}:{up.port} (tls: {up.tls}, verify: {verify}{preset})")
        code = max(code, await _check(cfg, up, to, mail_from))
    return code


async def _check(cfg: Config, up: UpstreamConfig, to: str | None, mail_from: str | None) -> int:
    session = Session(up, up.ehlo_name or cfg.listen.hostname)
    started = time.monotonic()
    try:
        await session.open()
        _print_steps(session)
        if not up.username:
            say(f"  {'auth':<8} skipped: no username configured")
        if to:
            await _send_test(session, cfg, up, to, mail_from)
    except UpstreamError as err:
        elapsed = time.monotonic() - started - sum(t.seconds for t in session.timings)
        _print_steps(session)
        _print_failure(err, elapsed)
        return 1
    finally:
        await session.close()
    say("ok: the upstream is reachable" + (" and accepts the login" if up.username else ""))
    return 0


def _print_steps(session: Session) -> None:
    for t in session.timings:
        detail = _extensions(session.extensions) if t.step == "ehlo" else _detail(t)
        say(f"  {t.step:<8} {t.seconds * 1000:7.1f} ms  {detail}")
    session.timings.clear()


def _extensions(ext: dict[str, str]) -> str:
    return ", ".join(f"{k.upper()} {v}".strip() for k, v in ext.items())


def _detail(t: StepTiming) -> str:
    d = t.detail
    if t.step == "dns":
        return ", ".join(d.get("addresses", []))
    if t.step == "connect":
        return str(d.get("address", ""))
    if t.step == "tls":
        return _tls_detail(d)
    if t.step == "auth":
        return f"{d.get('mechanism')} (offered: {d.get('offered')}): {d.get('reply')}"
    return " ".join(f"{k}={v}" for k, v in d.items())


def _tls_detail(d: dict[str, Any]) -> str:
    if not d:
        return ""
    parts = [f"{d.get('protocol')} {d.get('cipher')}"]
    if d.get("subject"):
        parts.append(f"certificate {d['subject']}")
    if d.get("expires_at"):
        days = (d["expires_at"] - time.time()) / 86400
        when = time.strftime("%Y-%m-%d", time.gmtime(d["expires_at"]))
        parts.append(f"expires {when} ({days:.0f} days)")
    parts.append("verified" if d.get("verified") else "NOT verified (upstream.verify: false)")
    return "; ".join(parts)


def _print_failure(err: UpstreamError, elapsed: float) -> None:
    say(f"  {err.step:<8} {elapsed * 1000:7.1f} ms  FAILED")
    say(f"failed at {err.step}: {err}")
    if err.code is not None or err.text:
        say(f"  server said: {err.code or ''} {err.text}".rstrip())
    if err.hint:
        say(f"  hint: {err.hint}")


async def _send_test(
    session: Session, cfg: Config, up: UpstreamConfig, to: str, mail_from: str | None
) -> None:
    sender = mail_from or (up.username if "@" in up.username else "")
    if not sender:
        sender = f"relayd@{cfg.listen.hostname}"
    data = test_message(sender, to)
    start = time.monotonic()
    outcomes = await session.send(sender, [to], data)
    ms = (time.monotonic() - start) * 1000
    o = outcomes[0]
    if o.status != OutcomeStatus.DELIVERED:
        raise UpstreamError(
            f"test message refused: {o.code} {o.text}",
            step=o.step,
            temporary=o.status != OutcomeStatus.PERMANENT,
            code=o.code,
            text=o.text,
            hint="the provider may require the sender to be your account: try --from",
        )
    say(f"  {'send':<8} {ms:7.1f} ms  to {to}: {o.code} {o.text}")


def test_message(sender: str, to: str) -> bytes:
    host = socket.gethostname()
    return (
        f"From: relayd check <{sender}>\r\nTo: <{to}>\r\n"
        f"Subject: relayd check from {host}\r\n"
        f"Date: {email.utils.formatdate(usegmt=True)}\r\n"
        f"Message-ID: {email.utils.make_msgid('relayd-check', domain=host)}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        f"This is a test message sent by `relayd check --to` on {host}.\r\n"
    ).encode()
