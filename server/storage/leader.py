"""One replica at a time for work that must not run twice (the proxies' fleet loop): a
PostgreSQL session advisory lock, held on a connection of its own for as long as the
replica leads. A replica that dies, or loses that connection, lets go of it, and another
takes it at its next try. SQLite is one process's database: that process leads."""

from __future__ import annotations

import contextlib
import logging
import zlib

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

log = logging.getLogger("tunnelplane.storage.leader")


class Leadership:
    """Whether this replica leads ``name``; :meth:`hold` tries to take it if not."""

    def __init__(self, engine: AsyncEngine, name: str) -> None:
        self._engine = engine
        self._key = zlib.crc32(f"tunnelplane:{name}".encode())  # a stable 32-bit key
        self._conn: AsyncConnection | None = None
        self._name = name

    async def hold(self) -> bool:
        """True while this replica leads (taking the lead if it is free)."""
        if self._engine.dialect.name != "postgresql":
            return True
        if self._conn is not None:
            try:
                await self._conn.execute(sa.text("SELECT 1"))
                await self._conn.commit()  # no transaction left open between checks
            except sa.exc.DBAPIError:
                log.warning("lost the lead", extra={"work": self._name})
                await self.release()
            else:
                return True
        return await self._take()

    async def _take(self) -> bool:
        try:
            conn = await self._engine.connect()
        except (sa.exc.DBAPIError, OSError):
            return False
        try:
            taken = (
                await conn.execute(sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": self._key})
            ).scalar_one()
            await conn.commit()
        except sa.exc.DBAPIError:
            await conn.close()
            return False
        if not taken:
            await conn.close()
            return False
        self._conn = conn
        log.info("took the lead", extra={"work": self._name})
        return True

    async def release(self) -> None:
        """Let go: unlock, then hand the connection back (the pool keeps the session, and a
        session lock with it, so unlocking is not left to closing)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            await conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": self._key})
            await conn.commit()
        except (sa.exc.DBAPIError, OSError):
            with contextlib.suppress(sa.exc.DBAPIError, OSError):
                await conn.invalidate()  # a broken session: the server ends it, lock and all
        with contextlib.suppress(sa.exc.DBAPIError, OSError):
            await conn.close()
