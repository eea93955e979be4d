"""The exceptions relayd raises across its own module boundaries."""

from __future__ import annotations

import errno as _errno


class RelaydError(Exception):
    """Base of every error relayd raises on purpose."""


class ConfigError(RelaydError):
    """The configuration cannot be used; the message names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class LibraryError(RelaydError):
    """An installed library lacks what relayd relies on (relayd.fences); restarting won't help."""


class SpoolError(RelaydError):
    """The spool could not be read or written; ``errno`` says why when the OS said so.

    ENOENT means the message is not (or no longer) there, e.g. an operator deleted it; any
    other errno means the spool refused the operation (read-only, full, not ours).
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno

    @property
    def errno_name(self) -> str:
        """The symbolic errno (EROFS, ENOSPC, ...), or "" when there is none."""
        return _errno.errorcode.get(self.errno, "") if self.errno else ""


class UpstreamError(RelaydError):
    """A session with the upstream failed before any per-recipient outcome was known.

    ``step`` names where it failed (connect, tls, ehlo, auth, mail, rcpt, data),
    ``code``/``text`` carry the server's reply when there was one. ``synthetic`` is true when
    relayd made the words itself (connection lost, timed out, no STARTTLS): only a reply the
    server sent may be classified by the reply rules (relayd.replies). ``reauth``: only an
    operator can fix it (a revoked OAuth grant): the upstream waits in state reauth.
    """

    def __init__(
        self,
        message: str,
        *,
        step: str,
        temporary: bool,
        code: int | None = None,
        text: str = "",
        hint: str = "",
        synthetic: bool | None = None,
        reauth: bool = False,
    ) -> None:
        super().__init__(message)
        self.step = step
        self.temporary = temporary
        self.code = code
        self.text = text
        self.hint = hint
        self.synthetic = code is None if synthetic is None else synthetic
        self.reauth = reauth
