"""The start-up check over the library fences: never run on a library that lacks what relayd
reaches into.

Each fence (aiosmtpd_fence, aiosmtplib_fence) lists its library's private members in
PRIVATE_MEMBERS and looks them up in missing(). A release that renamed one would otherwise be
found only by traffic: every message stored, then answered 421, so every client sends it
again. `relayd serve` and `relayd check` call check() before anything else.
"""

from __future__ import annotations

from importlib import metadata

from relayd import aiosmtpd_fence, aiosmtplib_fence
from relayd.errors import LibraryError

FENCES = (aiosmtpd_fence, aiosmtplib_fence)


async def check() -> None:
    """Raise LibraryError naming every listed member an installed library lacks."""
    for fence in FENCES:
        gone = await fence.missing()
        if gone:
            version = metadata.version(fence.LIBRARY)
            raise LibraryError(
                f"{fence.LIBRARY} {version} lacks {', '.join(gone)}, which relayd relies on "
                f"(relayd/{fence.__name__.rpartition('.')[2]}.py): install the version range "
                "relayd's pyproject.toml allows"
            )
