"""A spool message's files read back, and every OSError of the spool as a SpoolError.

Shared by the spool (relayd.spool), its locks (spool_lock) and its start-up scan (spool_scan);
the file layout is in relayd.spool's docstring.
"""

from __future__ import annotations

import errno
import functools
import json
import os
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from relayd.envelope import ENVELOPE_HEADER, Envelope, parse_header_line
from relayd.errors import SpoolError

HEAD_CHUNK = 64 * 1024
_P = ParamSpec("_P")
_R = TypeVar("_R")


def translated(what: str) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
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
                raise spool_error(what, exc) from exc

        return translated

    return wrap


def spool_error(what: str, exc: OSError) -> SpoolError:
    why = exc.strerror or os.strerror(exc.errno or errno.EIO)
    where = f" {exc.filename}" if exc.filename else ""
    return SpoolError(f"{what}{where}: {why}", errno=exc.errno or errno.EIO)


def missing(msg_id: str) -> SpoolError:
    return SpoolError(f"no such message: {msg_id}", errno=errno.ENOENT)


def load_json(path: str, msg_id: str, state: str) -> Envelope | None:
    """The envelope in a message's .json, or None when it has none."""
    try:
        with open(path, "rb") as fh:
            doc = json.loads(fh.read())
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise spool_error(f"cannot read envelope {msg_id}", exc) from None
    except ValueError as exc:
        raise SpoolError(f"unreadable envelope {msg_id}: {exc}") from None
    if not isinstance(doc, dict):
        raise SpoolError(f"malformed envelope {msg_id}")
    return Envelope.from_json(doc, state)


def read_eml(path: str, msg_id: str, state: str, body: bool) -> tuple[Envelope | None, bytes]:
    """The envelope line of an .eml (None if it has none) and, with body, the message."""
    try:
        with open(path, "rb", buffering=0) as fh:
            head = fh.read(HEAD_CHUNK)
            while head.startswith(ENVELOPE_HEADER) and b"\n" not in head:
                more = fh.read(HEAD_CHUNK)  # a very long recipient list
                if not more:
                    break
                head += more
            env, start = parse_header_line(head, msg_id, state)
            if not body:
                return env, b""
            if len(head) < HEAD_CHUNK:
                return env, head[start:]
            fh.seek(start)
            return env, fh.read()  # one allocation of the message's size, no copy
    except FileNotFoundError:
        raise missing(msg_id) from None
    except OSError as exc:
        raise spool_error(f"cannot read message {msg_id}", exc) from None
