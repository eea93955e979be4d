"""The start-up check over the library fences: never run on a library that lacks what relayd
reaches into without a way around it.

Each fence (aiosmtpd_fence, aiosmtplib_fence) lists its library's private members in
PRIVATE_MEMBERS, looks them up in missing(), and names in FALLBACKS the ones relayd can do
without (a fast path with a public fallback). A release that renamed any other would be found
only by traffic: every message stored, then answered 421, so every client sends it again.
`relayd serve` and `relayd check` call check() before anything else.
"""

from __future__ import annotations

from importlib import metadata

from relayd import aiosmtpd_fence, aiosmtplib_fence
from relayd.errors import LibraryError

FENCES = (aiosmtpd_fence, aiosmtplib_fence)


async def check() -> list[str]:
    """Raise LibraryError naming every needed member a library lacks; returns one note per
    library that lacks only members with a fallback (what relayd does instead)."""
    notes = []
    for fence in FENCES:
        gone = await fence.missing()
        needed = [member for member in gone if member not in fence.FALLBACKS]
        version = metadata.version(fence.LIBRARY)
        if needed:
            raise LibraryError(
                f"{fence.LIBRARY} {version} lacks {', '.join(needed)}, which relayd relies on "
                f"(relayd/{fence.__name__.rpartition('.')[2]}.py): install the version range "
                "relayd's pyproject.toml allows"
            )
        if gone:
            instead = "; ".join(sorted({fence.FALLBACKS[member] for member in gone}))
            notes.append(f"{fence.LIBRARY} {version} lacks {', '.join(gone)}: {instead}")
    return notes
