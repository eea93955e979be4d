"""Which asyncio event loop runs relayd: uvloop when installed (the `uvloop` extra), else asyncio.

uvloop does the socket, selector and transport work of the loop in C. Under the 2000 x 1 KiB
benchmark it cut the listener's and the delivery process's CPU per message by about an eighth
each (docs/benchmarks.md). relayd is written for plain asyncio and runs the same on either.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

CHOICES = ("auto", "asyncio", "uvloop")


def available() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def resolve(choice: str) -> str:
    """'auto' -> 'uvloop' if it is installed, else 'asyncio'; the others as they are."""
    if choice == "auto":
        return "uvloop" if available() else "asyncio"
    return choice


def run(main: Coroutine[Any, Any, T], choice: str) -> T:
    if resolve(choice) == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
