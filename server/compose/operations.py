"""Operations: long-running work (webhook replays) that callers poll, carried forward a
step at a time by a runner on any replica."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from server.compose.infrastructure import Infrastructure
from server.domain.operations.runner import OperationRunner, StepFn
from server.domain.operations.service import OperationService
from server.settings import Settings
from server.workers.operations import operations_loop
from server.workers.supervisor import Loop


@dataclass
class OperationsArea:
    """Operations and their runner."""

    settings: Settings
    operations: OperationService
    runner: OperationRunner
    #: Set when an operation is started on this replica: the runner looks at once.
    started: asyncio.Event

    def loops(self) -> Sequence[Loop]:
        """The runner's loop (unless this process is told not to run operations)."""
        if not self.settings.run_operations:
            return []
        return [operations_loop(self.runner, self.started)]

    async def aclose(self) -> None:
        """Nothing to release."""


def build(
    infra: Infrastructure, steps: Mapping[str, StepFn], started: asyncio.Event
) -> OperationsArea:
    """Operations over ``infra``; ``steps`` carries each kind of operation one step."""
    return OperationsArea(
        infra.settings,
        OperationService(infra.db, infra.lister),
        OperationRunner(infra.db, infra.clock, steps),
        started,
    )
