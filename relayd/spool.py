"""The on-disk queue. Synchronous; callers on the event loop run it with asyncio.to_thread.

Layout (every directory 0700, every file 0600)::

    queue/<id>.eml   "X-Relayd-Envelope: {json}" line, then the message bytes as received
    queue/<id>.json  delivery state, once the message was attempted or edited (wins over the line)
    failed/<id>.*    permanently failed (always with a .json)
    tmp/             partial writes          corrupt/  files moved aside at scan
    outbox/          --dev deliveries (the message only)

Durability (RFC 5321 §6.1: after 250 the message is ours): a file is written in tmp/,
fsynced, renamed into place, and the target directory is fsynced, so the rename itself survives
a power cut. A new message is one file: its envelope is the first line of the .eml, so the
rename of that one file is the commit point (one inode per message: see
docs/benchmarks.md#one-file-per-new-message).
Directory fsyncs of concurrent writers are shared (group commit): a writer whose rename an
fsync already covered does not issue another.

Spool is the face every caller uses; behind it, spool_files reads a message's files back (and
turns OSErrors into SpoolErrors), spool_lock holds the daemon and edit locks, and spool_scan
lists a directory and, at start-up, repairs what a crash left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import random
import secrets
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import structlog

from relayd.envelope import (
    ENVELOPE_HEADER,
    HISTORY_LIMIT,
    Envelope,
    Recipient,
    header_line,
    iso,
    parse_iso,
)
from relayd.envelope import dumps as _dumps
from relayd.errors import SpoolError
from relayd.spool_files import load_json, missing, read_eml, spool_error, translated
from relayd.spool_lock import SpoolLock
from relayd.spool_scan import SpoolScan
from relayd.states import RcptState, SpoolDir

# Envelope and its helpers live in relayd.envelope; spool.Envelope etc. stay importable.
__all__ = [
    "ENVELOPE_HEADER",
    "HISTORY_LIMIT",
    "Envelope",
    "Recipient",
    "Spool",
    "is_enospc",
    "iso",
    "parse_iso",
]

log = structlog.get_logger()


class Spool:
    """A spool directory; every method is blocking and safe to call from several threads."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.root = Path(path).absolute()
        # Uniqueness, not secrecy: one urandom seed per process instead of one per id.
        self._random = random.Random(secrets.randbits(64))  # noqa: S311 - ids, not secrets
        self._tmp_prefix = f"{os.getpid()}.{secrets.token_hex(4)}"
        self._tmp_seq = 0
        self._last_stamp = 0
        self._id_lock = threading.Lock()
        self._gen_lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._renamed: dict[str, int] = {}
        self._synced: dict[str, int] = {}
        self._locks = SpoolLock(self.root)
        self._scanner = SpoolScan(self.root)

    # -- layout ---------------------------------------------------------------------------

    def create(self) -> None:
        """Create the directories with mode 0700 (and warn if an existing one is wider)."""
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            for sub in (SpoolDir.QUEUE, SpoolDir.FAILED, SpoolDir.TMP, SpoolDir.CORRUPT):
                (self.root / sub).mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise spool_error(f"cannot create spool {self.root}", exc) from None
        self._check_dirs()

    @translated("cannot inspect the spool")
    def _check_dirs(self) -> None:
        for d in (
            self.root,
            *(self.root / s for s in (SpoolDir.QUEUE, SpoolDir.FAILED, SpoolDir.TMP)),
        ):
            mode = d.stat().st_mode & 0o777
            if mode & 0o077:
                log.warning("spool.mode_too_open", path=str(d), mode=oct(mode))
            if d.stat().st_uid != os.geteuid():
                log.warning("spool.wrong_owner", path=str(d), uid=d.stat().st_uid)

    def lock(self) -> None:
        """Take the spool's daemon lock (one serving relayd per spool) or raise SpoolError."""
        self._locks.lock()

    def unlock(self) -> None:
        self._locks.unlock()

    def daemon_pid(self) -> int | None:
        """The pid of the relayd serving this spool, or None when no daemon holds the lock."""
        return self._locks.daemon_pid()

    def editing(self, exclusive: bool = False) -> contextlib.AbstractContextManager[None]:
        """Hold the spool's edit lock: shared for the daemon's writes, exclusive for the CLI
        (spool_lock.SpoolLock.editing says why). Re-entrant within a thread."""
        return self._locks.editing(exclusive)

    def new_id(self) -> str:
        """An id that sorts by arrival and is unique across processes: time, then randomness."""
        with self._id_lock:
            stamp = max(time.time_ns() // 1000, self._last_stamp + 1)
            self._last_stamp = stamp
            suffix = self._random.getrandbits(32)
        when = datetime.fromtimestamp(stamp / 1e6, UTC).strftime("%Y%m%dT%H%M%S")
        return f"{when}.{stamp % 1_000_000:06d}Z.{suffix:08x}"

    def path(self, state: str, msg_id: str, ext: str) -> Path:
        return self.root / state / f"{msg_id}.{ext}"

    # -- durable writes --------------------------------------------------------------------

    def _write_tmp(self, *parts: bytes | bytearray) -> Path:
        """Write the parts, in order, to one new file in tmp/ and fsync it."""
        with self._id_lock:
            self._tmp_seq += 1
            name = f"{self._tmp_prefix}.{self._tmp_seq}.tmp"
        tmp = self.root / SpoolDir.TMP / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for data in parts:  # not joined: a 25 MiB message is not copied to prepend a line
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        os.close(fd)
        return tmp

    def _sync_dir(self, state: str) -> None:
        """fsync a directory unless an fsync begun after our rename already covered it."""
        with self._gen_lock:
            mine = self._renamed.get(state, 0)
        with self._sync_lock:
            if self._synced.get(state, 0) >= mine:
                return
            with self._gen_lock:
                target = self._renamed.get(state, 0)
            fd = os.open(self.root / state, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self._synced[state] = target

    def _renamed_into(self, state: str) -> None:
        with self._gen_lock:
            self._renamed[state] = self._renamed.get(state, 0) + 1

    def _place(self, tmp: Path, target: Path) -> None:
        os.rename(tmp, target)
        self._renamed_into(target.parent.name)

    def put(
        self,
        mail_from: str,
        rcpt_to: list[str],
        data: bytes | bytearray,
        now: float,
        msg_id: str = "",
        head: bytes = b"",
    ) -> Envelope:
        """Store a message durably; on return its file is fsynced and the id is safe to 250.

        head (header lines relayd adds) is written before data, so data is never copied.
        """
        env = Envelope(
            id=msg_id or self.new_id(),
            mail_from=mail_from,
            rcpt_to=tuple(Recipient(a) for a in rcpt_to),
            created_at=now,
            size=len(head) + len(data),
            next_attempt_at=now,
        )
        tmp: Path | None = None
        try:
            tmp = self._write_tmp(header_line(env), head, data)
            self._place(tmp, self.path(SpoolDir.QUEUE, env.id, "eml"))
            tmp = None
            self._sync_dir(SpoolDir.QUEUE)
        except OSError as exc:
            with contextlib.suppress(OSError):
                (tmp or self.path(SpoolDir.QUEUE, env.id, "eml")).unlink()
            why = os.strerror(exc.errno or errno.EIO)
            raise SpoolError(f"cannot write message: {why}", errno=exc.errno or errno.EIO) from exc
        return env

    @translated("cannot save the envelope")
    def save(self, env: Envelope) -> None:
        """Durably replace the envelope of a queued message (SpoolError ENOENT if deleted)."""
        tmp = self._write_tmp(_dumps(env))
        placed = False
        try:
            with self.editing():
                if not self.path(env.state, env.id, "eml").exists():
                    raise missing(env.id)
                self._place(tmp, self.path(env.state, env.id, "json"))
                placed = True
        finally:
            if not placed:
                with contextlib.suppress(OSError):
                    tmp.unlink()
        self._sync_dir(env.state)

    @translated("cannot remove the message")
    def remove(self, msg_id: str, state: str = SpoolDir.QUEUE, durable: bool = True) -> bool:
        """Delete a message (the .eml first: without it a leftover .json is no message).

        durable=False skips the directory fsync: after a delivery, a power cut that undoes
        the unlink only means the message is sent again (at least once), as with Postfix,
        which does not fsync a removal either.
        """
        found = False
        with self.editing():
            for ext in ("eml", "json"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.root, state, f"{msg_id}.{ext}"))
                    found = True
        if durable:
            self._renamed_into(state)
            self._sync_dir(state)
        return found

    @translated("cannot move the message")
    def move(self, env: Envelope, to: str) -> Envelope:
        """Move a message between queue/ and failed/ with its updated envelope.

        Order: the new json is written in the target, then the eml follows, then the old
        json goes. A crash in between leaves both jsons; scan() keeps the one whose eml is
        next to it.
        """
        moved = dataclasses.replace(env, state=to)
        tmp = self._write_tmp(_dumps(moved))
        with self.editing():
            if not self.path(env.state, env.id, "eml").exists():
                with contextlib.suppress(OSError):
                    tmp.unlink()  # deleted by an operator meanwhile: nothing left to move
                raise missing(env.id)
            try:
                self._place(tmp, self.path(to, env.id, "json"))
            except OSError:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
            os.rename(self.path(env.state, env.id, "eml"), self.path(to, env.id, "eml"))
            self._renamed_into(to)
            self._sync_dir(to)
            with contextlib.suppress(FileNotFoundError):
                self.path(env.state, env.id, "json").unlink()
            self._renamed_into(env.state)
            self._sync_dir(env.state)
        return moved

    @translated("cannot retry the message")
    def retry(self, msg_id: str, now: float, max_age: float) -> Envelope:
        """Make a queued or failed message due now, durably; failed ones move back to queue/.

        Refused recipients become pending again; delivered ones stay delivered. A failed
        message older than max_age starts a fresh max_age (else it would expire at once).
        """
        with self.editing(exclusive=True):
            env = self.find(msg_id)
            if env.state == SpoolDir.QUEUE:
                env = dataclasses.replace(env, next_attempt_at=now)
                self.save(env)
                return env
            rcpts = tuple(
                Recipient(r.address) if r.state == RcptState.REFUSED else r for r in env.rcpt_to
            )
            created = now if now - env.created_at > max_age else env.created_at
            env = dataclasses.replace(
                env, rcpt_to=rcpts, next_attempt_at=now, reason="", created_at=created
            )
            return self.move(env, SpoolDir.QUEUE)

    @translated("cannot delete the message")
    def delete(self, msg_id: str) -> Envelope:
        """Remove a queued or failed message for good (SpoolError if there is none)."""
        with self.editing(exclusive=True):
            env = self.find(msg_id)
            self.remove(env.id, env.state)
            return env

    # -- reads -------------------------------------------------------------------------------

    def load(self, msg_id: str, state: str = SpoolDir.QUEUE) -> Envelope:
        """A message's envelope: its .json if it has one, else the first line of its .eml."""
        # Plain str paths: pathlib's per-call parsing was a third of a 100,000-message scan.
        prefix = os.path.join(self.root, state, msg_id)
        env = load_json(prefix + ".json", msg_id, state)
        if env is None:
            env = read_eml(prefix + ".eml", msg_id, state, body=False)[0]
        if env is None:
            raise SpoolError(f"no envelope for message {msg_id}")
        return env

    def load_message(self, msg_id: str, state: str = SpoolDir.QUEUE) -> tuple[Envelope, bytes]:
        """Envelope and message bytes, reading the .eml once (what a delivery needs)."""
        prefix = os.path.join(self.root, state, msg_id)
        env = load_json(prefix + ".json", msg_id, state)
        head, data = read_eml(prefix + ".eml", msg_id, state, body=True)
        env = env or head
        if env is None:
            raise SpoolError(f"no envelope for message {msg_id}")
        return env, data

    def find(self, msg_id: str) -> Envelope:
        """Load a message from queue/ or failed/."""
        for state in (SpoolDir.QUEUE, SpoolDir.FAILED):
            if self.path(state, msg_id, "eml").exists():
                return self.load(msg_id, state)
        raise missing(msg_id)

    def read(self, env: Envelope) -> bytes:
        """The message as it is sent upstream (without relayd's envelope line)."""
        return read_eml(
            os.path.join(self.root, env.state, env.id + ".eml"), env.id, env.state, body=True
        )[1]

    def scan(self, state: str = SpoolDir.QUEUE, repair: bool = False) -> Iterator[Envelope]:
        """Yield every readable envelope in a state directory, oldest first.

        With repair (only the daemon, at start-up, holding the lock), orphans and corrupt
        files are moved to corrupt/ with a log line instead of being skipped.
        """
        if repair:
            # Repairs decide from a listing; the lock keeps a CLI's move out of that listing,
            # and, exclusive, the daemon's own removals too: a listing taken between a
            # removal's two unlinks shows a .json without its .eml, and the delivered
            # message's .json went to corrupt/ (a rescan while deliveries run).
            with self.editing(exclusive=True):
                yield from self._scanner.envelopes(state, repair)
        else:
            yield from self._scanner.envelopes(state, repair)

    def sweep_tmp(self) -> int:
        """Remove partial writes left by a crash; returns how many."""
        return self._scanner.sweep_tmp()

    @translated("cannot write to the outbox")
    def deliver_to_outbox(self, env: Envelope, data: bytes) -> Path:
        """--dev delivery: write the message as <spool>/outbox/<id>.eml."""
        (self.root / SpoolDir.OUTBOX).mkdir(mode=0o700, exist_ok=True)
        tmp = self._write_tmp(data)
        target = self.path(SpoolDir.OUTBOX, env.id, "eml")
        self._place(tmp, target)
        self._sync_dir(SpoolDir.OUTBOX)
        return target


def is_enospc(exc: BaseException) -> bool:
    return isinstance(exc, SpoolError | OSError) and exc.errno == errno.ENOSPC
