"""Call outcomes per minute: counts upserted per key, summed over a window."""

from __future__ import annotations

import builtins
from datetime import datetime

import sqlalchemy as sa

from server.domain.analytics.model import OutcomeCount
from server.storage.base import Repository
from server.storage.tables import call_outcomes

_o = call_outcomes.c


class SqlOutcomeRepository(Repository):
    """Per-minute outcome counts in SQL."""

    async def add_counts(self, counts: builtins.list[OutcomeCount]) -> None:
        # One statement may not touch a row twice (PostgreSQL): ids are distinct per
        # flush, as the service's keys are.
        await self._add_counts(
            call_outcomes,
            [
                {
                    "id": c.id,
                    "window_start": c.window_start,
                    "method": c.method[:200],
                    "code": c.code[:40],
                    "reason": c.reason[:100],
                    "category": c.category.value,
                    "count": c.count,
                }
                for c in counts
            ],
        )

    async def totals(
        self, start: datetime, end: datetime
    ) -> builtins.list[tuple[str, str, str, str, int]]:
        total = sa.func.sum(_o.count).label("total")
        stmt = (
            sa.select(_o.method, _o.code, _o.reason, _o.category, total)
            .where(_o.window_start >= start, _o.window_start < end)
            .group_by(_o.method, _o.code, _o.reason, _o.category)
        )
        return [
            (row["method"], row["code"], row["reason"], row["category"], int(row["total"]))
            for row in await self._all(stmt)
        ]

    async def delete_before(self, cutoff: datetime) -> None:
        await self._conn.execute(sa.delete(call_outcomes).where(_o.window_start < cutoff))
