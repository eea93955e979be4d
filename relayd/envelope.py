"""A queued message's envelope as records, and their two encodings in the spool.

``<id>.json`` holds Envelope.to_json() (indented); a new message's ``.eml`` starts with the
same JSON on one ``X-Relayd-Envelope:`` line. spool.Spool does the file I/O.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from relayd.errors import SpoolError
from relayd.states import RcptState, SpoolDir

HISTORY_LIMIT = 20
# The first line of every .eml relayd writes; never sent upstream. An .eml without it (written
# by an older relayd, always next to its .json) is the message alone.
ENVELOPE_HEADER = b"X-Relayd-Envelope: "


def iso(ts: float) -> str:
    """Seconds since the epoch -> '2026-11-30T05:14:00.123456Z'."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(text: str) -> float:
    """'2026-11-30T05:14:00.123456Z' -> seconds since the epoch (ValueError if malformed)."""
    # fromisoformat, not strptime: docs/benchmarks.md#start-up-scan
    if not (len(text) == 27 and text[-1] == "Z"):
        raise ValueError(f"not a spool timestamp: {text!r}")
    return datetime.fromisoformat(text).timestamp()


@dataclass(frozen=True, slots=True)
class Recipient:
    address: str
    state: str = RcptState.PENDING
    code: int | None = None
    reply: str = ""


@dataclass(frozen=True, slots=True)
class Envelope:
    """One queued message's envelope and delivery state, as kept in <id>.json."""

    id: str
    mail_from: str
    rcpt_to: tuple[Recipient, ...]
    created_at: float
    size: int
    attempts: int = 0
    next_attempt_at: float = 0.0
    last_error: dict[str, Any] | None = None
    history: tuple[dict[str, Any], ...] = ()
    reason: str = ""
    state: str = field(default=SpoolDir.QUEUE, compare=False)

    @property
    def pending(self) -> tuple[Recipient, ...]:
        return tuple(r for r in self.rcpt_to if r.state == RcptState.PENDING)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "id": self.id,
            "mail_from": self.mail_from,
            "rcpt_to": [dataclasses.asdict(r) for r in self.rcpt_to],
            "created_at": iso(self.created_at),
            "size": self.size,
            "attempts": self.attempts,
            "next_attempt_at": iso(self.next_attempt_at),
            "last_error": self.last_error,
            "history": list(self.history),
        }
        if self.reason:
            doc["reason"] = self.reason
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any], state: str = SpoolDir.QUEUE) -> Envelope:
        try:
            rcpts = tuple(
                Recipient(
                    str(r["address"]), str(r["state"]), r.get("code"), str(r.get("reply", ""))
                )
                for r in doc["rcpt_to"]
            )
            return cls(
                id=str(doc["id"]),
                mail_from=str(doc["mail_from"]),
                rcpt_to=rcpts,
                created_at=parse_iso(doc["created_at"]),
                size=int(doc["size"]),
                attempts=int(doc["attempts"]),
                next_attempt_at=parse_iso(doc["next_attempt_at"]),
                last_error=doc.get("last_error"),
                history=tuple(doc.get("history", ())),
                reason=str(doc.get("reason", "")),
                state=state,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SpoolError(f"malformed envelope: {exc!r}") from None


def dumps(env: Envelope) -> bytes:
    # An address kept with surrogateescape (invalid UTF-8 from a client) has lone surrogates,
    # which UTF-8 cannot encode: they are written as the JSON escape \udcXX, which reads back.
    text = json.dumps(env.to_json(), indent=1, ensure_ascii=False)
    return text.encode(errors="backslashreplace") + b"\n"


def header_line(env: Envelope) -> bytes:
    # One line: ASCII-only JSON escapes every control character, so no CR or LF can end it early.
    return ENVELOPE_HEADER + json.dumps(env.to_json(), separators=(",", ":")).encode() + b"\r\n"


def parse_header_line(head: bytes, msg_id: str, state: str) -> tuple[Envelope | None, int]:
    """(envelope, offset of the message) from the start of an .eml."""
    if not head.startswith(ENVELOPE_HEADER):
        return None, 0
    end = head.find(b"\n")
    if end < 0:
        raise SpoolError(f"truncated envelope line in message {msg_id}")
    try:
        doc = json.loads(head[len(ENVELOPE_HEADER) : end])
    except ValueError as exc:
        raise SpoolError(f"unreadable envelope line in message {msg_id}: {exc}") from None
    if not isinstance(doc, dict):
        raise SpoolError(f"malformed envelope line in message {msg_id}")
    return Envelope.from_json(doc, state), end + 1
