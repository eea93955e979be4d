"""The spool's two locks: relayd.lock (one serving daemon, its pid) and edit.lock (edits).

flock(2) on files in the spool's root, so they hold across processes and containers sharing
the volume, and a killed holder's lock goes with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from relayd.errors import SpoolError
from relayd.spool_files import spool_error, translated


class SpoolLock:
    """The daemon lock and the edit lock of one spool directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock_fd: int | None = None
        self._held = threading.local()

    @translated("cannot take the spool lock")
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
            raise spool_error("cannot take the edit lock", exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            self._held.depth = 1
            try:
                yield
            finally:
                self._held.depth = 0
        finally:
            os.close(fd)
