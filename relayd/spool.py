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
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import json
import os
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import ParamSpec, TypeVar

import structlog

from relayd.envelope import (
    ENVELOPE_HEADER,
    HISTORY_LIMIT,
    Envelope,
    Recipient,
    header_line,
    iso,
    parse_header_line,
    parse_iso,
)
from relayd.envelope import dumps as _dumps
from relayd.errors import SpoolError
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

_HEAD_CHUNK = 64 * 1024
_P = ParamSpec("_P")
_R = TypeVar("_R")


def _translated(what: str) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Every OSError of a spool operation becomes a SpoolError that keeps the errno.

    One error type for every caller (the relay, the listener, the CLI), and the errno stays
    available, so a read-only spool (EROFS), a full disk (ENOSPC) and a file that is not
    ours (EACCES, EPERM) can each be told apart without parsing a message.
    """

    def wrap(func: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(func)
        def translated(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return func(*args, **kwargs)
            except OSError as exc:
                raise _spool_error(what, exc) from exc

        return translated

    return wrap


def _spool_error(what: str, exc: OSError) -> SpoolError:
    why = exc.strerror or os.strerror(exc.errno or errno.EIO)
    where = f" {exc.filename}" if exc.filename else ""
    return SpoolError(f"{what}{where}: {why}", errno=exc.errno or errno.EIO)


def _missing(msg_id: str) -> SpoolError:
    return SpoolError(f"no such message: {msg_id}", errno=errno.ENOENT)


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
        self._lock_fd: int | None = None
        self._held = threading.local()

    # -- layout ---------------------------------------------------------------------------

    def create(self) -> None:
        """Create the directories with mode 0700 (and warn if an existing one is wider)."""
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            for sub in (SpoolDir.QUEUE, SpoolDir.FAILED, SpoolDir.TMP, SpoolDir.CORRUPT):
                (self.root / sub).mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise _spool_error(f"cannot create spool {self.root}", exc) from None
        self._check_dirs()

    @_translated("cannot inspect the spool")
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

    @_translated("cannot take the spool lock")
    def lock(self) -> None:
        """Take the spool's daemon lock (one serving relayd per spool) or raise SpoolError."""
        fd = os.open(self.root / "relayd.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolError(f"another relayd is serving {self.root}") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            os.close(fd)
            raise
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def daemon_pid(self) -> int | None:
        """The pid of the relayd serving this spool, or None when no daemon holds the lock."""
        path = self.root / "relayd.lock"
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.pread(fd, 32, 0).decode().strip()
                return int(text) if text.isdigit() else None
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def editing(self, exclusive: bool = False) -> Iterator[None]:
        """Hold the spool's edit lock: shared for the daemon's writes, exclusive for the CLI.

        The daemon's own writes never conflict with each other (it works on an id in one
        place at a time), so they share the lock. An operator command takes it exclusively
        around its read-modify-write, so it never rewrites an envelope from a stale read and
        never sees a half-done move. Re-entrant within a thread.
        """
        if getattr(self._held, "depth", 0):
            self._held.depth += 1
            try:
                yield
            finally:
                self._held.depth -= 1
            return
        try:
            fd = os.open(self.root / "edit.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise _spool_error("cannot take the edit lock", exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            self._held.depth = 1
            try:
                yield
            finally:
                self._held.depth = 0
        finally:
            os.close(fd)

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

    @_translated("cannot save the envelope")
    def save(self, env: Envelope) -> None:
        """Durably replace the envelope of a queued message (SpoolError ENOENT if deleted)."""
        tmp = self._write_tmp(_dumps(env))
        placed = False
        try:
            with self.editing():
                if not self.path(env.state, env.id, "eml").exists():
                    raise _missing(env.id)
                self._place(tmp, self.path(env.state, env.id, "json"))
                placed = True
        finally:
            if not placed:
                with contextlib.suppress(OSError):
                    tmp.unlink()
        self._sync_dir(env.state)

    @_translated("cannot remove the message")
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

    @_translated("cannot move the message")
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
                raise _missing(env.id)
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

    @_translated("cannot retry the message")
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

    @_translated("cannot delete the message")
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
        env = self._load_json(prefix + ".json", msg_id, state)
        if env is None:
            env = self._read_eml(prefix + ".eml", msg_id, state, body=False)[0]
        if env is None:
            raise SpoolError(f"no envelope for message {msg_id}")
        return env

    def load_message(self, msg_id: str, state: str = SpoolDir.QUEUE) -> tuple[Envelope, bytes]:
        """Envelope and message bytes, reading the .eml once (what a delivery needs)."""
        prefix = os.path.join(self.root, state, msg_id)
        env = self._load_json(prefix + ".json", msg_id, state)
        head, data = self._read_eml(prefix + ".eml", msg_id, state, body=True)
        env = env or head
        if env is None:
            raise SpoolError(f"no envelope for message {msg_id}")
        return env, data

    def _load_json(self, path: str, msg_id: str, state: str) -> Envelope | None:
        try:
            with open(path, "rb") as fh:
                doc = json.loads(fh.read())
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _spool_error(f"cannot read envelope {msg_id}", exc) from None
        except ValueError as exc:
            raise SpoolError(f"unreadable envelope {msg_id}: {exc}") from None
        if not isinstance(doc, dict):
            raise SpoolError(f"malformed envelope {msg_id}")
        return Envelope.from_json(doc, state)

    def _read_eml(
        self, path: str, msg_id: str, state: str, body: bool
    ) -> tuple[Envelope | None, bytes]:
        """The envelope line of an .eml (None if it has none) and, with body, the message."""
        try:
            with open(path, "rb", buffering=0) as fh:
                head = fh.read(_HEAD_CHUNK)
                while head.startswith(ENVELOPE_HEADER) and b"\n" not in head:
                    more = fh.read(_HEAD_CHUNK)  # a very long recipient list
                    if not more:
                        break
                    head += more
                env, start = parse_header_line(head, msg_id, state)
                if not body:
                    return env, b""
                if len(head) < _HEAD_CHUNK:
                    return env, head[start:]
                fh.seek(start)
                return env, fh.read()  # one allocation of the message's size, no copy
        except FileNotFoundError:
            raise _missing(msg_id) from None
        except OSError as exc:
            raise _spool_error(f"cannot read message {msg_id}", exc) from None

    def find(self, msg_id: str) -> Envelope:
        """Load a message from queue/ or failed/."""
        for state in (SpoolDir.QUEUE, SpoolDir.FAILED):
            if self.path(state, msg_id, "eml").exists():
                return self.load(msg_id, state)
        raise _missing(msg_id)

    def read(self, env: Envelope) -> bytes:
        """The message as it is sent upstream (without relayd's envelope line)."""
        return self._read_eml(
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
                yield from self._scan(state, repair)
        else:
            yield from self._scan(state, repair)

    def _scan(self, state: str, repair: bool) -> Iterator[Envelope]:
        # One pass over one listing (hot at start-up: see docs/benchmarks.md#start-up-scan).
        directory = self.root / state
        try:
            names = os.listdir(directory)
        except OSError as exc:
            raise _spool_error("cannot list", exc) from None
        # Two flat sets, not a set per message: docs/benchmarks.md#start-up-scan
        jsons: set[str] = set()
        emls: set[str] = set()
        for name in names:
            if name.endswith(".json"):
                jsons.add(name[:-5])
            elif name.endswith(".eml"):
                emls.add(name[:-4])
            elif repair:
                self._quarantine(directory / name, "unknown file")
        del names
        prefix = os.path.join(directory, "")
        for stem in sorted(jsons | emls):
            if stem not in emls:
                if repair:
                    self._repair_half(state, stem)
                continue
            has_json = stem in jsons
            if repair:
                self._check_owner_and_mode(state, stem, has_json)
            try:
                env = (
                    self._load_json(prefix + stem + ".json", stem, state)
                    if has_json
                    else self._read_eml(prefix + stem + ".eml", stem, state, body=False)[0]
                )
            except SpoolError as exc:
                self._unloadable(state, stem, has_json, exc, repair)
                continue
            if env is not None:
                yield env
            elif repair:
                self._quarantine(self.path(state, stem, "eml"), "message without envelope")

    def _unloadable(
        self, state: str, stem: str, has_json: bool, exc: SpoolError, repair: bool
    ) -> None:
        """A message whose envelope cannot be read: damage goes to corrupt/ (with repair);
        a permission problem is not damage: say how to fix it, leave the files in place."""
        if exc.errno in (errno.EACCES, errno.EPERM):
            path = self.path(state, stem, "eml")
            log.error(
                "spool.unreadable",
                msg_id=stem,
                error=str(exc),
                fix=f"chown {os.geteuid()}:{os.getegid()} {path.with_suffix('.*')} (the user "
                "relayd runs as); the next rescan picks it up",
            )
        elif repair:
            if has_json:
                self._quarantine(self.path(state, stem, "json"), str(exc))
            why = "envelope corrupt" if has_json else str(exc)
            self._quarantine(self.path(state, stem, "eml"), why)

    def _check_owner_and_mode(self, state: str, stem: str, has_json: bool) -> None:
        """Report files another user owns and tighten modes wider than 0600 (mail is private)."""
        # str paths and os.stat, not pathlib: docs/benchmarks.md#start-up-scan
        prefix = os.path.join(self.root, state, stem)
        for ext in ("eml", "json") if has_json else ("eml",):
            path = f"{prefix}.{ext}"
            try:
                st = os.stat(path)
                if st.st_uid != os.geteuid():
                    log.warning("spool.wrong_owner", path=str(path), uid=st.st_uid)
                if st.st_mode & 0o077:
                    os.chmod(path, 0o600)
                    log.warning("spool.mode_fixed", path=str(path), was=oct(st.st_mode & 0o777))
            except OSError as exc:
                log.error("spool.unreadable", path=str(path), error=exc.strerror)

    def _repair_half(self, state: str, stem: str) -> None:
        """A .json without its .eml: an interrupted move() or remove(), or damage."""
        other = SpoolDir.FAILED if state == SpoolDir.QUEUE else SpoolDir.QUEUE
        if self.path(other, stem, "eml").exists() and self.path(other, stem, "json").exists():
            # An interrupted move(): the eml already went to `other`, whose json is the newer.
            self.path(state, stem, "json").unlink()
            log.info("spool.move_completed", msg_id=stem, state=other)
            return
        self._quarantine(self.path(state, stem, "json"), "envelope without message")

    def _quarantine(self, path: Path, reason: str) -> None:
        target = self.root / SpoolDir.CORRUPT / path.name
        try:
            os.rename(path, target)
        except OSError as exc:
            log.error("spool.quarantine_failed", path=str(path), error=exc.strerror)
            return
        log.warning("spool.quarantined", path=str(path), moved_to=str(target), reason=reason)

    @_translated("cannot sweep tmp/")
    def sweep_tmp(self) -> int:
        """Remove partial writes left by a crash; returns how many."""
        count = 0
        for entry in os.scandir(self.root / SpoolDir.TMP):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                count += 1
        if count:
            log.info("spool.tmp_swept", files=count)
        return count

    @_translated("cannot write to the outbox")
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
