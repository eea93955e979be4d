"""Reading a spool directory's messages back, and the start-up repair of what a crash left.

Spool.scan is the public face (it takes the edit lock a repair needs); this module is the
one pass over a listing (hot at start-up: see docs/benchmarks.md#start-up-scan) and, with
repair, what happens to orphans, damage and loose modes.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

import structlog

from relayd.envelope import Envelope
from relayd.errors import SpoolError
from relayd.spool_files import load_json, read_eml, spool_error, translated
from relayd.states import SpoolDir

log = structlog.get_logger()


class SpoolScan:
    """Scans and repairs under one spool root (the caller holds the edit lock for repair)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, state: str, stem: str, ext: str) -> Path:
        return self.root / state / f"{stem}.{ext}"

    def envelopes(self, state: str, repair: bool) -> Iterator[Envelope]:
        """Every readable envelope in state/, oldest first; with repair, damage moved aside."""
        jsons, emls = self._listing(state, repair)
        prefix = os.path.join(self.root, state, "")
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
                    load_json(prefix + stem + ".json", stem, state)
                    if has_json
                    else read_eml(prefix + stem + ".eml", stem, state, body=False)[0]
                )
            except SpoolError as exc:
                self._unloadable(state, stem, has_json, exc, repair)
                continue
            if env is not None:
                yield env
            elif repair:
                self._quarantine(self.path(state, stem, "eml"), "message without envelope")

    def _listing(self, state: str, repair: bool) -> tuple[set[str], set[str]]:
        """The stems with a .json and those with an .eml (unknown files quarantined)."""
        directory = self.root / state
        try:
            names = os.listdir(directory)
        except OSError as exc:
            raise spool_error("cannot list", exc) from None
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
        return jsons, emls

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

    @translated("cannot sweep tmp/")
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
