"""What `relayd oauth` keeps on disk: the refresh token file and its state file beside it.

Both are replaced atomically, 0600 (tmp, fsync, rename, directory fsync); the state file holds
expiry, last refresh and granted scopes for `relayd oauth status`, never a token.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

from relayd.config import OAuth2Config


def write_secret_file(path: str, text: str) -> None:
    """Replace path with text, 0600, atomically: tmp, fsync, rename, directory fsync."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    dfd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_refresh_token(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return ""


def state_path(cfg: OAuth2Config) -> str:
    """Where expiry, last refresh and granted scopes are kept for `relayd oauth status`."""
    return cfg.refresh_token_file + ".state.json" if cfg.refresh_token_file else ""


def read_state(cfg: OAuth2Config) -> dict[str, Any]:
    path = state_path(cfg)
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8")) if path else {}
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def write_state(cfg: OAuth2Config, update: dict[str, Any]) -> None:
    """Merge update into the state file (a success clears the last error); no token in it."""
    path = state_path(cfg)
    if not path:
        return
    state = read_state(cfg)
    if "refreshed_at" in update:
        state.pop("error", None)
        state.pop("error_at", None)
    state.update(update)
    write_secret_file(path, json.dumps(state, sort_keys=True) + "\n")


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
