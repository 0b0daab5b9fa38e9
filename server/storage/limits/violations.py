"""Rate-limit violations: aggregated counts, upserted per key."""

from __future__ import annotations

import builtins
from datetime import datetime

import sqlalchemy as sa

from server.domain.common.listing import ListQuery
from server.domain.limits.model import ViolationRecord
from server.storage.base import Repository
from server.storage.query import apply_list_query
from server.storage.tables import rate_limit_violations

_v = rate_limit_violations.c
COLUMNS = {
    "subject": _v.subject,
    "ip_address": _v.ip_address,
    "method": _v.method,
    "policy": _v.policy,
    "window_start": _v.window_start,
}
GROUPS = {"subject": _v.subject, "method": _v.method, "ip_address": _v.ip_address}


def _record(row: sa.RowMapping) -> ViolationRecord:
    return ViolationRecord(
        row["id"],
        row["window_start"],
        row["subject"],
        row["ip_address"],
        row["method"],
        row["policy"],
        row["count"],
    )


class SqlViolationRepository(Repository):
    """Aggregated violations in SQL."""

    async def add_counts(self, records: builtins.list[ViolationRecord]) -> None:
        """Add each record's count to its row (created when missing)."""
        await self._add_counts(
            rate_limit_violations,
            [
                {
                    "id": r.id,
                    "window_start": r.window_start,
                    "subject": r.subject[:200],
                    "ip_address": r.ip_address[:64],
                    "method": r.method[:200],
                    "policy": r.policy[:40],
                    "count": r.count,
                }
                for r in records
            ],
        )

    async def list(self, query: ListQuery) -> builtins.list[ViolationRecord]:
        stmt = apply_list_query(sa.select(rate_limit_violations), query, COLUMNS, _v.id)
        return [_record(row) for row in await self._all(stmt)]

    async def total(self, since: datetime) -> int:
        stmt = sa.select(sa.func.coalesce(sa.func.sum(_v.count), 0)).where(_v.window_start >= since)
        return int(await self._conn.scalar(stmt) or 0)

    async def top(self, group: str, since: datetime, limit: int) -> builtins.list[tuple[str, int]]:
        column = GROUPS[group]
        total = sa.func.sum(_v.count).label("total")
        stmt = (
            sa.select(column.label("key"), total)
            .where(_v.window_start >= since)
            .group_by(column)
            .order_by(total.desc(), column)
            .limit(limit)
        )
        return [(row["key"], int(row["total"])) for row in await self._all(stmt)]

    async def delete_before(self, cutoff: datetime) -> None:
        await self._conn.execute(sa.delete(rate_limit_violations).where(_v.window_start < cutoff))
