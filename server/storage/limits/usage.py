"""Monthly request counts: absolute figures per user and month, each row only ever raised.

Writing the larger of the stored and the given figure makes a roll-up idempotent: running
it twice, or two replicas writing the same counter at once, can never add anything twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from server.domain.limits.model import MonthlyRequests
from server.storage.base import Repository
from server.storage.tables import monthly_request_usage, users

_u = monthly_request_usage.c
#: Users looked up per statement: well under SQLite's bound-parameter limit.
CHUNK = 500
_EXISTING = sa.select(users.c.id).where(users.c.id.in_(sa.bindparam("ids", expanding=True)))


def _raise(dialect: Any) -> sa.Insert:
    stmt = dialect.insert(monthly_request_usage)
    return stmt.on_conflict_do_update(  # type: ignore[no-any-return]
        index_elements=[_u.user_id, _u.month],
        set_={"requests": stmt.excluded.requests, "update_time": stmt.excluded.update_time},
        where=_u.requests < stmt.excluded.requests,
    )


#: One statement per dialect, compiled once and run with many rows.
_RAISE = {"postgresql": _raise(postgresql), "sqlite": _raise(sqlite)}


class SqlRequestUsageRepository(Repository):
    """Monthly request counts in SQL."""

    async def raise_to(self, rows: Sequence[MonthlyRequests], now: datetime) -> None:
        """Upsert each row, keeping the larger count. Rows go in key order, so that two
        replicas writing overlapping sets lock them in the same order (no deadlock); rows
        of users that no longer exist are left out."""
        ordered = sorted(rows, key=lambda r: (r.user_id, r.month))
        for start in range(0, len(ordered), CHUNK):
            await self._raise_chunk(ordered[start : start + CHUNK], now)

    async def _raise_chunk(self, rows: Sequence[MonthlyRequests], now: datetime) -> None:
        ids = sorted({r.user_id for r in rows})
        existing = set(await self._conn.scalars(_EXISTING, {"ids": ids}))
        values = [
            {"user_id": r.user_id, "month": r.month, "requests": r.requests, "update_time": now}
            for r in rows
            if r.user_id in existing
        ]
        if values:
            await self._conn.execute(_RAISE[self._conn.dialect.name], values)

    async def get(self, user_id: str, month: date) -> int:
        """The persisted count of ``user_id`` in the month starting ``month`` (0 if none)."""
        stmt = sa.select(_u.requests).where(_u.user_id == user_id, _u.month == month)
        return int(await self._conn.scalar(stmt) or 0)
