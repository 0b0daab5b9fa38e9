"""The event log in SQL."""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa

from server.domain.common.listing import ListQuery
from server.domain.events.model import Event
from server.storage.base import Repository
from server.storage.query import apply_list_query
from server.storage.tables import events

EVENT_COLUMNS = {
    "type": events.c.type,
    "subject": events.c.subject,
    "create_time": events.c.time,
}


def _event(row: sa.RowMapping) -> Event:
    return Event(
        row["id"],
        row["type"],
        row["subject"],
        row["user_id"],
        row["actor"],
        row["time"],
        row["payload"],
    )


class SqlEventRepository(Repository):
    """The event log in SQL (append-only)."""

    async def add(self, event: Event) -> None:
        await self._conn.execute(
            events.insert().values(
                id=event.id,
                type=event.type,
                subject=event.subject,
                user_id=event.user_id,
                actor=event.actor,
                time=event.time,
                payload=event.payload,
            )
        )

    async def list(self, user_id: str, query: ListQuery) -> builtins.list[Event]:
        stmt = sa.select(events).where(events.c.user_id == user_id)
        stmt = apply_list_query(stmt, query, EVENT_COLUMNS, events.c.id)
        return [_event(r) for r in await self._all(stmt)]

    async def get(self, event_id: str) -> Event | None:
        row = await self._one(sa.select(events).where(events.c.id == event_id))
        return None if row is None else _event(row)

    async def by_ids(self, event_ids: Sequence[str]) -> builtins.list[Event]:
        if not event_ids:
            return []
        stmt = sa.select(events).where(events.c.id.in_(list(event_ids)))
        return [_event(r) for r in await self._all(stmt)]

    async def between(
        self, user_id: str, start: datetime, end: datetime, after_id: str, limit: int
    ) -> builtins.list[Event]:
        """The owner's events in [start, end), by id, after ``after_id``."""
        stmt = (
            sa.select(events)
            .where(
                events.c.user_id == user_id,
                events.c.time >= start,
                events.c.time < end,
                events.c.id > after_id,
            )
            .order_by(events.c.id)
            .limit(limit)
        )
        return [_event(r) for r in await self._all(stmt)]

    async def count_by_type(self, user_id: str, start: datetime, end: datetime) -> dict[str, int]:
        """How many of the owner's events in [start, end) there are of each type."""
        stmt = (
            sa.select(events.c.type, sa.func.count())
            .where(events.c.user_id == user_id, events.c.time >= start, events.c.time < end)
            .group_by(events.c.type)
        )
        return {str(t): int(n) for t, n in await self._conn.execute(stmt)}
