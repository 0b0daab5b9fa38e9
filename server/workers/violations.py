"""The log of refused calls (:class:`server.domain.limits.service.ViolationLog`) is written
every few seconds in aggregate, once more on the way out, and pruned hourly."""

from __future__ import annotations

from server.domain.limits.service import ViolationLog
from server.workers.supervisor import Loop

PRUNE_INTERVAL = 3600.0


def violation_loops(violations: ViolationLog, interval: float) -> list[Loop]:
    """Flush every ``interval`` seconds and drop entries past retention every hour (each
    first one interval after start); the last flush when the server stops."""

    async def flush() -> None:
        await violations.flush()

    return [
        Loop("violations", flush, interval, immediately=False, drain=flush),
        Loop("violations-prune", violations.prune, PRUNE_INTERVAL, immediately=False),
    ]
