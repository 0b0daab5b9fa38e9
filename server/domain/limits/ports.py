"""What limits need: a limiter that keeps the counters (Redis, or this process), and
storage for monthly request counts and aggregated refusals.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from datetime import date, datetime
from typing import Protocol

from server.domain.common.listing import ListQuery
from server.domain.limits.model import Check, Decision, IpBlock, MonthlyRequests, ViolationRecord


class Limiter(Protocol):
    """Where limiter state lives: Redis, or this process."""

    @property
    def backend(self) -> str:
        """``redis`` or ``memory``."""
        ...

    async def decide(self, check: Check) -> Decision:
        """Answer one check, counting it unless it is a dry run or refused."""
        ...

    async def blocks(self) -> list[IpBlock]:
        """Addresses blocked now."""
        ...

    async def lift(self, ip: str) -> bool:
        """End a block early; whether there was one."""
        ...

    async def counter(self, key: str) -> int:
        """The value of a quota counter."""
        ...

    async def seed(self, key: str, amount: int) -> bool:
        """Add ``amount`` to a quota counter that exists (one the store lost and a call
        made again); whether it existed."""
        ...

    async def flush_counts(self) -> dict[str, tuple[int, bool]]:
        """Add the quota counts this replica made and the store does not hold yet to the
        store now; per counter flushed, its value in the store and whether the flush made
        it again (the store had lost it)."""
        ...


class ViolationRepository(Protocol):
    """Aggregated rate-limit refusals."""

    async def add_counts(self, records: builtins.list[ViolationRecord]) -> None: ...
    async def list(self, query: ListQuery) -> builtins.list[ViolationRecord]: ...
    async def total(self, since: datetime) -> int: ...
    async def top(
        self, group: str, since: datetime, limit: int
    ) -> builtins.list[tuple[str, int]]: ...
    async def delete_before(self, cutoff: datetime) -> None: ...


class RequestUsageRepository(Protocol):
    """Monthly request counts, persisted from the rate limiter's counters."""

    async def raise_to(self, rows: Sequence[MonthlyRequests], now: datetime) -> None:
        """Set each row's count to the larger of the stored and the given one."""
        ...

    async def get(self, user_id: str, month: date) -> int:
        """The persisted count (0 when there is none)."""
        ...
