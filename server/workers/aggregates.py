"""Counts kept in memory and written in aggregate (the violation log, call outcomes): a
flush every few seconds, once more on the way out, and pruning past retention hourly."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from server.workers.supervisor import Loop

PRUNE_INTERVAL = 3600.0


def aggregate_loops(
    name: str,
    flush: Callable[[], Awaitable[object]],
    prune: Callable[[], Awaitable[None]],
    interval: float,
) -> list[Loop]:
    """``name``: flush every ``interval`` seconds; ``name-prune``: drop entries past
    retention every hour (each first one interval after start); the last flush when the
    server stops."""

    async def flushed() -> None:
        await flush()

    return [
        Loop(name, flushed, interval, immediately=False, drain=flushed),
        Loop(f"{name}-prune", prune, PRUNE_INTERVAL, immediately=False),
    ]
