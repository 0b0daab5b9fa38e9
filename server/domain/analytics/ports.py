"""What analytics needs from storage."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from server.domain.analytics.model import OutcomeCount


class OutcomeRepository(Protocol):
    """Per-minute counts of call outcomes."""

    async def add_counts(self, counts: list[OutcomeCount]) -> None:
        """Add each count to its row (created when missing)."""
        ...

    async def totals(self, start: datetime, end: datetime) -> list[tuple[str, str, str, str, int]]:
        """(method, code, reason, category, count) summed over [start, end)."""
        ...

    async def delete_before(self, cutoff: datetime) -> None:
        """Drop counts of minutes before ``cutoff``."""
        ...
