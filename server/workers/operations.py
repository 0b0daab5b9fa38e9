"""The operations loop: carries long-running operations (webhook replays) forward on any
replica, a step at a time (:class:`server.domain.operations.runner.OperationRunner`)."""

from __future__ import annotations

import asyncio

from server.domain.operations.runner import OperationRunner
from server.workers.supervisor import Loop

POLL_INTERVAL = 1.0


def operations_loop(
    runner: OperationRunner, started: asyncio.Event, poll_interval: float = POLL_INTERVAL
) -> Loop:
    """Step operations back to back while there is work; otherwise look again every
    ``poll_interval`` seconds, or at once when ``started`` is set (an operation was just
    started on this replica)."""

    async def step() -> float | None:
        return 0.0 if await runner.run_once() else None

    return Loop("operations", step, poll_interval, wake=started)
