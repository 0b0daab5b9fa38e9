"""What every repository shares: the connection and unique-violation translation."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from server.domain.common.errors import AlreadyExists


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

    async def _insert(
        self, table: sa.Table, values: dict[str, Any], resource: str, name: str
    ) -> None:
        """Insert a row; a unique violation becomes :class:`AlreadyExists`."""
        try:
            async with self._conn.begin_nested():
                await self._conn.execute(table.insert().values(**values))
        except sa.exc.IntegrityError:
            raise AlreadyExists(resource, name) from None
