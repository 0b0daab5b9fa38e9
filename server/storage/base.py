"""What every repository shares: the connection, unique-violation translation and the
optimistic update of a versioned row."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from server.domain.common.errors import Aborted, AlreadyExists, NotFound


class Repository:
    """A repository bound to the connection of one unit of work."""

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def _one(
        self, stmt: sa.Executable, params: dict[str, Any] | None = None
    ) -> sa.RowMapping | None:
        result = await self._conn.execute(stmt, params)
        return result.mappings().first()

    async def _all(self, stmt: sa.Executable) -> list[sa.RowMapping]:
        result = await self._conn.execute(stmt)
        return list(result.mappings().all())

    def _insert_stmt(self, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
        """An INSERT of this connection's dialect, which can say what to do on conflict."""
        if self._conn.dialect.name == "postgresql":
            return postgresql.insert(table)
        return sqlite.insert(table)

    async def _add_counts(self, table: sa.Table, rows: list[dict[str, Any]]) -> None:
        """Insert ``rows`` of an aggregate table (keyed by ``id``), adding each one's
        ``count`` to the row already there: replicas add to one row per key."""
        if not rows:
            return
        stmt = self._insert_stmt(table).values(rows)
        stmt = stmt.on_conflict_do_update(
            index_elements=[table.c.id], set_={"count": table.c.count + stmt.excluded.count}
        )
        await self._conn.execute(stmt)

    async def _insert(
        self, table: sa.Table, values: dict[str, Any], resource: str, name: str
    ) -> None:
        """Insert a row; a unique violation becomes :class:`AlreadyExists`."""
        try:
            async with self._conn.begin_nested():
                await self._conn.execute(table.insert().values(**values))
        except sa.exc.IntegrityError:
            raise AlreadyExists(resource, name) from None

    async def _update_versioned(
        self,
        table: sa.Table,
        row_id: str,
        expected_version: int,
        values: dict[str, Any],
        resource: str,
        name: str,
    ) -> None:
        """Write ``values`` to the row ``row_id`` if its ``version`` is still
        ``expected_version`` (``values`` sets the next one): :class:`NotFound` if the row
        is gone, :class:`Aborted` (``CONCURRENT_UPDATE``) if another write came first."""
        result = await self._conn.execute(
            sa.update(table)
            .where(table.c.id == row_id, table.c.version == expected_version)
            .values(**values)
        )
        if result.rowcount:
            return
        if await self._one(sa.select(table.c.id).where(table.c.id == row_id)) is None:
            raise NotFound(resource, name)
        raise Aborted(f"the {resource} was changed concurrently; retry", reason="CONCURRENT_UPDATE")
