"""`relayd sendmail` / `relayd-sendmail`: the sendmail command line in front of relayd.

The message goes to relayd's own listener over SMTP, like any app's. When nothing listens
(the daemon is stopped) it is written straight into the spool with Spool.put, the same
durable write the listener does (a maildrop), and goes out when the daemon starts. Exit codes
are sendmail's (sysexits.h): 0 ok, 64 usage, 65 bad message, 67 recipient refused,
75 temporary failure (try again later), 78 bad configuration.
"""

from __future__ import annotations

import argparse
import email.utils
import getpass
import re
import smtplib
import sys
import time
from collections.abc import Sequence
from email.parser import BytesHeaderParser
from typing import Any, NoReturn

from relayd import logs
from relayd.cli.common import become_owner, load_config, signal_daemon, warn
from relayd.config import Config
from relayd.errors import ConfigError, RelaydError, SpoolError
from relayd.message import missing_headers, unsendable
from relayd.spool import Spool
from relayd.states import LogFormat

EX_OK, EX_USAGE, EX_DATAERR, EX_NOUSER, EX_TEMPFAIL, EX_CONFIG = 0, 64, 65, 67, 75, 78
SUBMIT_TIMEOUT = 60.0
HIDDEN = (b"bcc", b"resent-bcc")


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    # prefix_chars="+": every sendmail flag (-t, -oi, -f addr) reaches our own parser as is.
    p = sub.add_parser(
        "sendmail",
        prefix_chars="+",
        add_help=False,
        help="sendmail-compatible submission (also installed as relayd-sendmail)",
    )
    p.add_argument("argv", nargs="*", help="sendmail arguments, e.g. -t -i")
    p.set_defaults(func=lambda args: main(args.argv))


def build_parser() -> Parser:
    p = Parser(prog="relayd-sendmail", add_help=False, allow_abbrev=False)
    p.add_argument("--help", action="store_true")
    p.add_argument("--config", "-C", metavar="PATH", default=None)
    p.add_argument("-t", action="store_true", help="recipients from To/Cc/Bcc")
    p.add_argument("-i", action="store_true", help="a line with a single dot is not the end")
    p.add_argument("-o", action="append", default=[], metavar="OPT", help="-oi as -i; others")
    p.add_argument("-f", "-r", dest="sender", metavar="ADDR", help="envelope sender")
    p.add_argument("-F", dest="fullname", metavar="NAME", help="full name for a new From:")
    p.add_argument("-b", dest="mode", default="m", metavar="MODE", help="only -bm")
    for ignored in ("-B", "-N", "-R", "-V", "-L", "-X"):
        p.add_argument(ignored, metavar="ARG", help=argparse.SUPPRESS)
    p.add_argument("-v", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("recipients", nargs="*")
    return p


def main(argv: Sequence[str]) -> int:
    """Run sendmail; never raises, returns a sysexits.h code."""
    try:
        args = build_parser().parse_args(list(argv))
    except UsageError as exc:
        warn(f"relayd-sendmail: {exc}")
        return EX_USAGE
    if args.help:
        build_parser().print_help()
        return EX_OK
    try:
        return _run(args)
    except UsageError as exc:
        warn(f"relayd-sendmail: {exc}")
        return EX_USAGE
    except ConfigError as exc:
        warn(f"relayd-sendmail: config: {exc}")
        return EX_CONFIG
    except RelaydError as exc:
        warn(f"relayd-sendmail: {exc}")
        return EX_TEMPFAIL


def _run(args: argparse.Namespace) -> int:
    if args.mode != "m":
        raise UsageError(f"-b{args.mode} is not supported (only -bm, deliver mail)")
    raw = sys.stdin.buffer.read()
    dots_end = not (args.i or "i" in args.o)
    data = normalize(raw, dots_end)
    rcpts = list(args.recipients)
    if args.t:
        rcpts += header_recipients(data)
        data = strip_headers(data, HIDDEN)
    rcpts = list(dict.fromkeys(a for a in rcpts if a))
    if not rcpts:
        raise UsageError("no recipients (give addresses, or -t to read To/Cc/Bcc)")
    logs.setup(LogFormat.CONSOLE, "warning")
    cfg = load_config(args)
    sender = args.sender.strip("<>") if args.sender is not None else default_sender(cfg)
    data = complete_headers(data, sender, args.fullname)
    return submit(cfg, sender, rcpts, data, args.v)


def normalize(raw: bytes, dots_end: bool) -> bytes:
    """CRLF line ends; without -i a line holding a single dot ends the message."""
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out: list[bytes] = []
    for line in lines:
        line = line.removesuffix(b"\r")
        if dots_end and line == b".":
            break
        out.append(line)
    return b"".join(line + b"\r\n" for line in out)


def _split(data: bytes) -> tuple[bytes, bytes]:
    head, sep, body = data.partition(b"\r\n\r\n")
    return (head + b"\r\n", body) if sep else (data, b"")


def header_recipients(data: bytes) -> list[str]:
    head, _ = _split(data)
    msg = BytesHeaderParser().parsebytes(head)
    fields = [str(v) for name in ("To", "Cc", "Bcc") for v in msg.get_all(name, [])]
    return [addr for _, addr in email.utils.getaddresses(fields) if addr]


def strip_headers(data: bytes, names: tuple[bytes, ...]) -> bytes:
    """Drop header fields (with their folded continuation lines) by name; body untouched."""
    head, body = _split(data)
    kept: list[bytes] = []
    dropping = False
    for line in head.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = line.split(b":", 1)[0].strip().lower() in names
        if not dropping:
            kept.append(line)
    return b"".join(line + b"\r\n" for line in kept) + b"\r\n" + body


def complete_headers(data: bytes, sender: str, fullname: str | None) -> bytes:
    """Add From (with -F's name) when the message lacks it.

    Date and Message-ID are the listener's job (message.missing_headers), and the
    maildrop path calls the same function, so both ways in add them alike.
    """
    head, _ = _split(data)
    present = {m.group(1).lower() for m in re.finditer(rb"^([!-9;-~]+):", head, flags=re.MULTILINE)}
    if not head.strip():
        data = b"\r\n" + data
    if b"from" in present:
        return data
    return f"From: {email.utils.formataddr((fullname or '', sender))}\r\n".encode() + data


def default_sender(cfg: Config) -> str:
    """The provider's account if it is an address (most reject other senders), else user@host."""
    if "@" in cfg.upstream.username:
        return cfg.upstream.username
    return f"{getpass.getuser()}@{cfg.listen.hostname}"


def submit(cfg: Config, sender: str, rcpts: list[str], data: bytes, verbose: bool) -> int:
    """Hand the message to the listener; on no answer at all, to the spool (maildrop)."""
    host = cfg.listen.host
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"  # a wildcard listener is reachable on loopback
    try:
        with smtplib.SMTP(
            host, cfg.listen.port, local_hostname="localhost", timeout=SUBMIT_TIMEOUT
        ) as smtp:
            refused = smtp.sendmail(sender, rcpts, data)
    except smtplib.SMTPRecipientsRefused as exc:
        return _refused(exc.recipients)
    except smtplib.SMTPResponseException as exc:
        err = exc.smtp_error
        text = err.decode(errors="replace") if isinstance(err, bytes) else str(err)
        warn(f"relayd-sendmail: refused: {exc.smtp_code} {text}")
        return EX_TEMPFAIL if exc.smtp_code < 500 else EX_DATAERR
    except (OSError, smtplib.SMTPException) as exc:
        # Nothing accepted it (refused, reset, timed out): keep it in the spool ourselves.
        return maildrop(cfg, sender, rcpts, data, exc, verbose)
    if verbose:
        warn(f"relayd-sendmail: handed to relayd at {host}:{cfg.listen.port}")
    return _refused(refused) if refused else EX_OK


def _refused(refused: dict[str, tuple[int, Any]]) -> int:
    for addr, (code, text) in refused.items():
        words = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
        warn(f"relayd-sendmail: {addr}: {code} {words}")
    temporary = any(code < 500 for code, _ in refused.values())
    return EX_TEMPFAIL if temporary else EX_NOUSER


def maildrop(
    cfg: Config, sender: str, rcpts: list[str], data: bytes, why: Exception, verbose: bool
) -> int:
    """Write the message into the spool directly; the daemon sends it when it (re)scans."""
    bad = [a for a in [sender, *rcpts] if unsendable(a)]
    if bad:  # what the listener refuses at MAIL/RCPT is not spooled behind its back either
        warn(f"relayd-sendmail: {bad[0]}: control character or invalid UTF-8 in the address")
        return EX_DATAERR
    spool = Spool(cfg.spool.path)
    msg_id, now = spool.new_id(), time.time()
    head = missing_headers(data, msg_id, cfg.listen.hostname, now)
    try:
        become_owner(spool)  # root writes as the spool's owner, or the daemon cannot read it
        spool.create()
        env = spool.put(sender, rcpts, data, now, msg_id, head)
    except SpoolError as exc:
        raise SpoolError(
            f"relayd is not accepting mail ({why}) and the spool is not writable: {exc}"
        ) from None
    try:
        pid = signal_daemon(spool)
    except SpoolError:
        pid = None
    when = f"relayd (pid {pid}) will pick it up" if pid else "it goes out when relayd starts"
    if verbose:
        warn(f"relayd-sendmail: queued {env.id} in {spool.root} ({when})")
    return EX_OK
