"""What the upstream said, written down: a decision carried out on the spool, or held.

Never sent twice by a process that knows it was delivered. When the spool refuses to record
an outcome (read-only, full, a file the daemon may not touch), the decision is held here in
memory, its message stays in flight so nothing dispatches or rescans it again, and only the
bookkeeping is retried, backing off like deliveries do, until the spool takes it. A bug while
deciding or recording is treated the same way: what the upstream said is never thrown away
to send the message again. The fact
lives as long as the process: a restart before the spool recovers sends the message again
(at least once), which is all a process that forgot can do.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from relayd import outcome
from relayd.config import RetryConfig
from relayd.errors import SpoolError

log = structlog.get_logger()

Write = Callable[[], Awaitable[None]]


class Ledger:
    """Outcomes the spool has not recorded yet: held in memory, retried with backoff."""

    def __init__(
        self,
        retry: Callable[[], RetryConfig],
        clock: Callable[[], float],
        inflight: set[str],
        forget: Callable[[str], None],
    ) -> None:
        self.retry, self.clock = retry, clock
        self.inflight, self.forget = inflight, forget
        self.held: dict[str, Exception] = {}
        # What status reports and `relayd health` shows while anything is held.
        self.spool_error: dict[str, Any] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def record(self, msg_id: str, write: Write, bound: Any, failures: int = 0) -> None:
        """Run write (decide, then the spool operations); if it fails, hold and retry it."""
        try:
            await write()
        except SpoolError as exc:
            if exc.errno != errno.ENOENT:
                self._hold(msg_id, write, bound, exc, failures + 1)
                return
            self.forget(msg_id)  # deleted by an operator during the attempt
        except Exception as exc:
            bound.error("delivery.record_crashed", exc_info=exc)
            self._hold(msg_id, write, bound, exc, failures + 1)
            return
        if self.held.pop(msg_id, None) is not None:
            self.inflight.discard(msg_id)
            bound.info("delivery.recorded", after_failures=failures)
            if not self.held:
                self.spool_error = None
            elif self.spool_error is not None:
                self.spool_error = {**self.spool_error, "held": len(self.held)}

    def _hold(self, msg_id: str, write: Write, bound: Any, exc: Exception, failures: int) -> None:
        self.inflight.add(msg_id)  # never dispatched again while held
        self.held[msg_id] = exc
        since = (self.spool_error or {}).get("since") or self.clock()
        name = exc.errno_name if isinstance(exc, SpoolError) else ""
        text = str(exc) if isinstance(exc, SpoolError) else f"{type(exc).__name__}: {exc}"
        self.spool_error = {
            "errno": name,
            "text": text,
            "since": since,
            "held": len(self.held),
        }
        rt = self.retry()
        delay = outcome.backoff(failures, rt.initial_delay, rt.max_delay)
        bound.error(
            "delivery.unrecorded",
            errno=name,
            error=text,
            failures=failures,
            retry_in=round(delay, 3),
            detail="the spool refused to record the outcome; it is kept in memory and the "
            "message is not sent again by this process",
        )

        async def again() -> None:
            await asyncio.sleep(delay)
            await self.record(msg_id, write, bound, failures)

        task = asyncio.create_task(again())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop retrying (the process is stopping); say what was never recorded."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.held:
            log.error(
                "delivery.unrecorded_at_stop",
                messages=sorted(self.held),
                detail="the spool never took these outcomes: the next start sends them again",
            )
