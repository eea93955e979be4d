"""The --dev deliverer: every message goes to <spool>/outbox/ instead of a provider."""

from __future__ import annotations

import asyncio

from relayd.spool import Envelope, Recipient, Spool
from relayd.states import OutcomeStatus
from relayd.upstream import Outcome, Result, Submission


class Outbox:
    """--dev deliverer: writes each message to <spool>/outbox/<id>.eml instead of sending it."""

    pipelining = False

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.sent = 0

    async def open(self) -> None:
        return None

    async def send(self, mail_from: str, rcpt_to: list[str], data: bytes) -> list[Outcome]:
        msg_id = self.spool.new_id()
        stub = Envelope(msg_id, mail_from, tuple(Recipient(a) for a in rcpt_to), 0.0, len(data))
        # What a local delivery agent adds, so the envelope is visible in the file.
        head = f"Return-Path: <{mail_from}>\r\nX-Original-To: {', '.join(rcpt_to)}\r\n"
        path = await asyncio.to_thread(self.spool.deliver_to_outbox, stub, head.encode() + data)
        self.sent += 1
        return [
            Outcome(a, OutcomeStatus.DELIVERED, 250, f"written to {path}", "data", synthetic=True)
            for a in rcpt_to
        ]

    async def send_many(self, subs: list[Submission]) -> list[Result]:
        return [await self.send(s.mail_from, list(s.rcpt_to), s.data) for s in subs]

    async def close(self) -> None:
        return None
