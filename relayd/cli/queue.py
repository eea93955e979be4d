"""`relayd queue list|show|retry|flush|delete`: read and steer the spool from another process.

Reads need no lock (every file appears by rename, so a reader sees an old or a new version,
never half of one). Edits go through Spool.retry/delete, which hold the spool's edit lock
exclusively, and then SIGUSR2 the daemon so it rescans.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from relayd import text
from relayd.cli.common import load_config, open_spool, say, signal_daemon, warn
from relayd.errors import RelaydError, SpoolError
from relayd.spool import Envelope, Spool, iso
from relayd.states import RcptState, SpoolDir
from relayd.wire import STATUS_FILE

STATES: dict[str, str] = {"queued": SpoolDir.QUEUE, "failed": SpoolDir.FAILED}
NAMES: dict[str, str] = {SpoolDir.QUEUE: "queued", SpoolDir.FAILED: "failed"}


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    queue = sub.add_parser("queue", help="inspect and steer the spool")
    qsub = queue.add_subparsers(dest="queue_command", required=True, metavar="COMMAND")
    ls = qsub.add_parser("list", parents=[common], help="one row per message")
    ls.add_argument("--json", action="store_true", help="machine-readable (see docs)")
    ls.add_argument("--state", choices=sorted(STATES), help="only queued or only failed")
    ls.set_defaults(func=cmd_list)
    show = qsub.add_parser("show", parents=[common], help="envelope, recipients, history")
    show.add_argument("id", help="message id (or a unique part of it, e.g. its last 8 hex)")
    show.add_argument("--raw", action="store_true", help="print the message itself")
    show.add_argument("--json", action="store_true", help="the list --json record + history")
    show.set_defaults(func=cmd_show)
    retry = qsub.add_parser("retry", parents=[common], help="due now (failed ones too)")
    retry.add_argument("ids", nargs="*", metavar="ID")
    retry.add_argument("--all", action="store_true", help="every queued and failed message")
    retry.set_defaults(func=cmd_retry)
    flush = qsub.add_parser("flush", parents=[common], help="every queued message due now")
    flush.set_defaults(func=cmd_flush)
    delete = qsub.add_parser("delete", parents=[common], help="remove messages for good")
    delete.add_argument("ids", nargs="*", metavar="ID")
    group = delete.add_mutually_exclusive_group()
    group.add_argument("--failed", action="store_true", help="everything in failed/")
    group.add_argument("--all", action="store_true", help="everything, queued and failed")
    delete.add_argument("--yes", action="store_true", help="confirm --failed / --all")
    delete.set_defaults(func=cmd_delete)


# -- reading ----------------------------------------------------------------------------------


def record(env: Envelope, now: float, history: bool = False) -> dict[str, Any]:
    """The documented JSON shape of one message (docs/operating.md lists every field)."""
    doc: dict[str, Any] = {
        "id": env.id,
        "state": NAMES.get(env.state, env.state),
        "created_at": iso(env.created_at),
        "age_seconds": round(now - env.created_at, 3),
        "mail_from": env.mail_from,
        "recipients": [
            {"address": r.address, "state": r.state, "code": r.code, "reply": r.reply}
            for r in env.rcpt_to
        ],
        "size": env.size,
        "attempts": env.attempts,
        "next_attempt_at": iso(env.next_attempt_at) if env.state == SpoolDir.QUEUE else None,
        "last_error": env.last_error,
        "reason": env.reason or None,
        "upstream": last_upstream(env),  # the one the latest attempt used (None: not tried)
    }
    if history:
        doc["history"] = list(env.history)
    return doc


def last_upstream(env: Envelope) -> str | None:
    for entry in reversed(env.history):
        if entry.get("upstream"):
            return str(entry["upstream"])
    return None


def scan(spool: Spool, only: str | None) -> list[Envelope]:
    states = [STATES[only]] if only else [SpoolDir.QUEUE, SpoolDir.FAILED]
    envs = [env for state in states for env in spool.scan(state)]
    return sorted(envs, key=lambda e: e.id)


def resolve(spool: Spool, ident: str) -> Envelope:
    """A message by its id, or by a part of the id that matches exactly one message."""
    try:
        return spool.find(ident)
    except SpoolError:
        pass
    matches = [e for e in scan(spool, None) if ident in e.id]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise SpoolError(f"no such message: {ident}")
    raise SpoolError(f"{ident} matches {len(matches)} messages; give more of the id")


def ago(seconds: float) -> str:
    """A short relative duration: 42s, 7m, 3h, 2d."""
    s = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{int(s // size)}{unit}"
    return f"{int(s)}s"


def cmd_list(args: argparse.Namespace) -> int:
    spool = open_spool(load_config(args))
    envs = scan(spool, args.state)
    now = time.time()
    waiting = upstream_waiting(spool.root, now)
    if args.json:
        # One record per line: json's C encoder only runs without indent, and with 100,000
        # queued messages the indented form took most of the command's 9 s.
        out = sys.stdout
        out.write("[\n")
        for i, env in enumerate(envs):
            # ASCII JSON: every control character (C1 included) is a \\u escape, and an
            # address that was not UTF-8 (a lone surrogate) cannot make the encoder raise.
            doc = record(env, now)
            if waiting and env.state == SpoolDir.QUEUE and env.next_attempt_at <= now:
                doc["waiting"] = waiting
            out.write(("," if i else "") + json.dumps(doc) + "\n")
        out.write("]\n")
        return 0
    if not envs:
        say("queue empty" if args.state != "failed" else "no failed messages")
        return 0
    width = shutil.get_terminal_size((120, 24)).columns
    rows = [_row(e, now, waiting) for e in envs]
    head = ["ID", "STATE", "AGE", "TRIES", "NEXT", "SIZE", "VIA", "FROM", "TO", "LAST"]
    if all(r[6] in ("-", "default") for r in rows):  # one upstream: VIA says nothing
        head, rows = head[:6] + head[7:], [r[:6] + r[7:] for r in rows]
    queued = sum(e.state == SpoolDir.QUEUE for e in envs)
    say(*table(head, rows, width), f"{queued} queued, {len(envs) - queued} failed")
    return 0


def upstream_waiting(root: Any, now: float) -> str:
    """Why due messages are not being sent (the upstream's rate, quota or pause), as the
    running daemon last reported it in status.json; '' when nothing waits or it is stale."""
    try:
        doc = json.loads((Path(root) / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    if not isinstance(doc, dict) or now - float(doc.get("updated_at") or 0.0) > 30.0:
        return ""
    ups = doc.get("upstreams")
    if not isinstance(ups, list):
        return ""
    said = [str(u.get("waiting") or "") for u in ups if isinstance(u, dict)]
    return "; ".join(" ".join(w.split()) for w in said if w.strip())


def _row(env: Envelope, now: float, waiting: str = "") -> list[str]:
    last = env.reason if env.state == SpoolDir.FAILED else describe_error(env.last_error)
    if env.state == SpoolDir.QUEUE:
        wait = env.next_attempt_at - now
        nxt = "now" if wait <= 0 else f"in {ago(wait)}"
        if wait <= 0 and waiting:
            nxt, last = "waiting", waiting
    else:
        nxt = "-"
    rcpts = ", ".join(
        r.address if r.state == RcptState.PENDING else f"{r.address} [{r.state}]"
        for r in env.rcpt_to
    )
    return [
        env.id.rsplit(".", 1)[-1],
        NAMES.get(env.state, env.state),
        ago(now - env.created_at),
        str(env.attempts),
        nxt,
        size(env.size),
        last_upstream(env) or "-",
        env.mail_from or "<>",
        rcpts,
        last,
    ]


def describe_error(err: dict[str, Any] | None) -> str:
    if not err:
        return ""
    code = f"{err['code']} " if err.get("code") else ""
    held = f"{err['action']} " if err.get("action") else ""  # pause | throttle | reauth
    return f"{held}{err.get('step', '?')}: {code}{err.get('text', '')}".replace("\n", " ")


def size(n: int) -> str:
    return f"{n}" if n < 10_000 else f"{n // 1024}K" if n < 10_000_000 else f"{n >> 20}M"


def table(head: list[str], rows: list[list[str]], width: int) -> list[str]:
    """Lines of columns padded to their widest cell; the last three share what is left."""
    # Widths as shown: say() escapes control characters, which makes a cell longer.
    rows = [[text.printable(cell) for cell in row] for row in rows]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fixed = sum(widths[:-3]) + 2 * (len(head) - 1)
    room = max(width - fixed, 30)
    want = widths[-3:]
    if sum(want) > room:
        # FROM and TO get up to a quarter each, LAST what remains.
        frm = min(want[0], room // 4)
        to = min(want[1], room // 4)
        widths[-3:] = [frm, to, max(room - frm - to, 8)]
    lines = []
    for r in [head, *rows]:
        cells = [_fit(c, w) for c, w in zip(r, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return lines


def _fit(text: str, width: int) -> str:
    return text.ljust(width) if len(text) <= width else text[: max(width - 1, 0)] + "…"


def cmd_show(args: argparse.Namespace) -> int:
    spool = open_spool(load_config(args))
    env = resolve(spool, args.id)
    if args.raw:
        raw = spool.read(env)
        if sys.stdout.isatty():  # the message as text, its control characters escaped
            say(*raw.decode("utf-8", "surrogateescape").replace("\r\n", "\n").split("\n"))
        else:  # byte for byte into a pipe or a file
            sys.stdout.buffer.write(raw)
            sys.stdout.flush()
        return 0
    now = time.time()
    if args.json:
        json.dump(record(env, now, history=True), sys.stdout, indent=1)  # ASCII: see cmd_list
        sys.stdout.write("\n")
        return 0
    say(*_show_lines(env, now))
    return 0


def _show_lines(env: Envelope, now: float) -> list[str]:
    lines = [
        f"id:        {env.id}",
        f"state:     {NAMES.get(env.state, env.state)}",
        f"received:  {iso(env.created_at)} ({ago(now - env.created_at)} ago)",
        f"from:      <{env.mail_from}>",
        f"size:      {env.size} bytes",
        f"attempts:  {env.attempts}",
    ]
    if env.state == SpoolDir.QUEUE:
        wait = env.next_attempt_at - now
        when = "now" if wait <= 0 else f"in {ago(wait)}"
        lines.append(f"next:      {iso(env.next_attempt_at)} ({when})")
    if env.last_error:
        lines.append(f"error:     {describe_error(env.last_error)}")
    if env.reason:
        lines.append(f"reason:    {env.reason}")
    lines.append("recipients:")
    for r in env.rcpt_to:
        reply = f"  {r.code} {r.reply}" if r.code else ""
        lines.append(f"  {r.state:<9}  {r.address}{reply}")
    if env.history:
        lines.append("history:")
    for h in env.history:
        code = f"{h.get('code')} " if h.get("code") else ""
        what = f"  {h.get('step', '')}: {code}{h.get('text', '')}" if h.get("step") else ""
        via = f" via {h['upstream']}" if h.get("upstream") else ""
        sent_as = f" as <{h['sent_as']}>" if h.get("sent_as") else ""
        lines.append(f"  #{h.get('attempt')}  {h.get('at')}  {h.get('result')}{via}{sent_as}{what}")
        for f in h.get("failover") or ():
            fcode = f"{f.get('code')} " if f.get("code") else ""
            lines.append(
                f"       after {f.get('upstream')} failed at {f.get('step')}: "
                f"{fcode}{f.get('text', '')}".replace("\n", " ")
            )
    return lines


# -- editing ----------------------------------------------------------------------------------


def _targets(spool: Spool, ids: list[str], every: bool, states: tuple[str, ...]) -> list[str]:
    if every:
        return [e.id for state in states for e in spool.scan(state)]
    if not ids:
        raise RelaydError("name at least one message id (or use --all)")
    return [resolve(spool, i).id for i in ids]


def _report(spool: Spool, verb: str, count: int, missing: list[str]) -> int:
    for ident in missing:
        warn(f"relayd: no such message: {ident}")
    pid = signal_daemon(spool) if count else None
    where = (
        f"relayd (pid {pid}) will attempt them now"
        if pid and verb == "retried"
        else "no relayd is running; they go out at its next start"
        if verb == "retried"
        else ""
    )
    say(f"{verb} {count} message{'s' if count != 1 else ''}" + (f"; {where}" if where else ""))
    return 1 if missing else 0


def _retry(spool: Spool, ids: list[str], max_age: float) -> tuple[int, list[str]]:
    done, missing = 0, []
    for msg_id in ids:
        try:
            spool.retry(msg_id, time.time(), max_age)
            done += 1
        except SpoolError:
            missing.append(msg_id)  # delivered or deleted since we listed it
    return done, missing


def cmd_retry(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    spool = open_spool(cfg, write=True)
    ids = _targets(spool, args.ids, args.all, (SpoolDir.QUEUE, SpoolDir.FAILED))
    done, missing = _retry(spool, ids, cfg.retry.max_age)
    return _report(spool, "retried", done, [] if args.all else missing)


def cmd_flush(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    spool = open_spool(cfg, write=True)
    done, _ = _retry(spool, _targets(spool, [], True, (SpoolDir.QUEUE,)), cfg.retry.max_age)
    return _report(spool, "retried", done, [])


def cmd_delete(args: argparse.Namespace) -> int:
    spool = open_spool(load_config(args), write=True)
    bulk = args.all or args.failed
    if bulk and args.ids:
        raise RelaydError("give ids or --failed/--all, not both")
    if bulk and not args.yes:
        raise RelaydError("bulk delete needs --yes (nothing was deleted)")
    states = (SpoolDir.FAILED,) if args.failed else (SpoolDir.QUEUE, SpoolDir.FAILED)
    ids = _targets(spool, args.ids, bulk, states)
    done, missing = 0, []
    for msg_id in ids:
        try:
            spool.delete(msg_id)
            done += 1
        except SpoolError:
            missing.append(msg_id)
    return _report(spool, "deleted", done, [] if bulk else missing)
