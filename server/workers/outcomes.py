"""Every call's outcome (:class:`server.domain.analytics.service.CallOutcomes`) is written
every few seconds in aggregate, once more on the way out, and pruned hourly."""

from __future__ import annotations

from server.domain.analytics.service import CallOutcomes
from server.workers.supervisor import Loop

PRUNE_INTERVAL = 3600.0


def outcome_loops(outcomes: CallOutcomes, interval: float) -> list[Loop]:
    """Flush every ``interval`` seconds and drop counts past retention every hour (each
    first one interval after start); the last flush when the server stops."""

    async def flush() -> None:
        await outcomes.flush()

    return [
        Loop("call-outcomes", flush, interval, immediately=False, drain=flush),
        Loop("call-outcomes-prune", outcomes.prune, PRUNE_INTERVAL, immediately=False),
    ]
