"""The event loop both ends of the link run on: uvloop where it is installed (Linux and
macOS), asyncio's own elsewhere (Windows, where the agent runs too).

In one run of ``python -m bench.proxies`` uvloop's C event loop and TLS carried 8 % more
1 KiB requests a second through a proxy and its agent, and 4 % more bulk (bench/README.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to its end on a new event loop, uvloop's if it is there."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
