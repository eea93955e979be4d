"""Fence: where relayd takes a session over from aiosmtplib.

aiosmtplib (>=4.0.0, <6) does connect, TLS (implicit and STARTTLS), EHLO and AUTH. It reads one
reply per command it waits for and treats a reply that arrives earlier as an error, so it
cannot carry a pipelined flight (RFC 2920). Once the session is logged in, relayd moves the
transport to its own protocol (relayd.link.Link) with asyncio's public
``transport.set_protocol``; aiosmtplib's SMTP object is then used only to close the connection.

No private member is used: PRIVATE_MEMBERS and FALLBACKS are empty, and missing() finds nothing
to lack (relayd.fences still runs it at start). What the hand-over relies on: the public
``SMTP.transport`` is the live (TLS) transport, and aiosmtplib's protocol holds no unread reply
after the lock-step AUTH (nothing was pipelined before it, so nothing can be left behind).
"""

from __future__ import annotations

import asyncio
from typing import cast

import aiosmtplib

from relayd.link import Link

LIBRARY = "aiosmtplib"
PRIVATE_MEMBERS: dict[str, tuple[str, ...]] = {}
FALLBACKS: dict[str, str] = {}


async def missing() -> list[str]:
    """The PRIVATE_MEMBERS this aiosmtplib lacks: none are used, so none."""
    return []


def hand_over(smtp: aiosmtplib.SMTP, timeout: float) -> Link:
    """A Link reading and writing smtp's transport from now on; smtp must not send again."""
    transport = smtp.transport
    # uvloop's transports are not asyncio.Transport subclasses; they have its methods.
    if transport is None or not hasattr(transport, "set_protocol"):
        raise RuntimeError("aiosmtplib left no transport to take over")
    return Link.attach(cast(asyncio.Transport, transport), timeout)
