"""Submitter credentials: a users file of salted scrypt hashes (`relayd passwd` makes them).

A users file has one ``name:scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>`` line per submitter
(``#`` comments and blank lines allowed). Passwords are never stored, logged or compared in
plain; a verification costs one scrypt (about 50 ms), so a successful one is remembered as an
HMAC under a per-process key and an app that logs in per message does not pay it each time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from pathlib import Path

from relayd.errors import ConfigError

SCHEME = "scrypt"
N, R, P = 2**14, 8, 1  # scrypt's interactive-login parameters (RFC 7914 §2): 16 MiB, ~50 ms
_KEY = secrets.token_bytes(32)


def hash_password(password: str, salt: bytes | None = None) -> str:
    """A self-describing salted scrypt hash of password, for one users-file line."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=N, r=R, p=P, dklen=32)
    b64 = base64.b64encode
    return f"{SCHEME}${N}${R}${P}${b64(salt).decode()}${b64(digest).decode()}"


def _check(stored: str, password: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != SCHEME:
            return False
        want = base64.b64decode(digest)
        got = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(want),
            maxmem=128 * 1024 * 1024,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


class Users:
    """The submitters allowed to AUTH; verify() is constant-time per stored hash."""

    def __init__(self, hashes: dict[str, str]) -> None:
        self._hashes = hashes
        self._verified: set[tuple[str, bytes]] = set()

    def __repr__(self) -> str:
        return f"<auth.Users {len(self._hashes)} users>"

    def __len__(self) -> int:
        return len(self._hashes)

    def verify(self, name: str, password: str) -> bool:
        stored = self._hashes.get(name)
        if stored is None:
            _check(hash_password("", b"\0" * 16), password)  # same cost for unknown names
            return False
        token = (name, hmac.digest(_KEY, stored.encode() + b"\0" + password.encode(), "sha256"))
        if token in self._verified:
            return True
        if _check(stored, password):
            self._verified.add(token)
            return True
        return False


def load_users(path: str) -> Users:
    """Read a users file; raise ConfigError naming listen.users_file on any bad line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("listen.users_file", f"cannot read: {exc.strerror}") from None
    hashes: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, stored = line.partition(":")
        if not sep or not name or not stored.startswith(SCHEME + "$"):
            raise ConfigError(
                "listen.users_file", f"line {number}: expected name:scrypt$… (relayd passwd)"
            )
        hashes[name] = stored
    return Users(hashes)
