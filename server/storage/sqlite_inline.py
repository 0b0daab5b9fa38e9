"""SQLite on the event loop's own thread, for the embedded default.

aiosqlite runs each connection in a thread and hands every statement, fetch, BEGIN and
ROLLBACK across threads; on a small machine each hand-off costs more than the query.
A local SQLite statement on an indexed key takes microseconds, so running it inline is
cheaper, provided nothing ever waits on SQLite's lock inside the loop: every write
transaction in this process takes an asyncio lock first (see
:class:`server.storage.database.Database`), so in-process writers queue on the loop, not
in SQLite. WAL mode means readers never wait for writers.

This module gives SQLAlchemy's aiosqlite dialect an ``async_creator`` whose connection
and cursors look like aiosqlite's but complete synchronously.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any


class InlineCursor:
    """An aiosqlite-shaped cursor whose coroutines finish at once."""

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = cursor

    async def __aenter__(self) -> InlineCursor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._cursor.close()

    @property
    def description(self) -> Any:
        """As sqlite3."""
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        """As sqlite3."""
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        """As sqlite3."""
        return self._cursor.lastrowid

    @property
    def arraysize(self) -> int:
        """As sqlite3."""
        return self._cursor.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cursor.arraysize = value

    async def execute(self, sql: str, parameters: Sequence[Any] = ()) -> InlineCursor:
        """Run one statement."""
        self._cursor.execute(sql, parameters)
        return self

    async def executemany(self, sql: str, parameters: Iterable[Sequence[Any]]) -> InlineCursor:
        """Run one statement per parameter set."""
        self._cursor.executemany(sql, parameters)
        return self

    async def fetchone(self) -> Any:
        """As sqlite3."""
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        """As sqlite3."""
        return self._cursor.fetchmany(size if size is not None else self._cursor.arraysize)

    async def fetchall(self) -> list[Any]:
        """As sqlite3."""
        return self._cursor.fetchall()

    async def close(self) -> None:
        """As sqlite3."""
        self._cursor.close()


class _ImmediateQueue:
    """Stands in for aiosqlite's request queue (used by SQLAlchemy to set isolation)."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def put_nowait(self, item: tuple[asyncio.Future[Any], Any]) -> None:
        future, function = item
        try:
            future.set_result(function())
        except Exception as exc:  # noqa: BLE001 - handed to the awaiting caller
            future.set_exception(exc)


class InlineConnection:
    """An aiosqlite-shaped connection over a plain ``sqlite3`` connection."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._conn = connection
        self._connection: sqlite3.Connection | None = connection
        self._tx = _ImmediateQueue(connection)

    @property
    def isolation_level(self) -> str | None:
        """As sqlite3."""
        return self._conn.isolation_level

    def cursor(self) -> InlineCursor:
        """A new cursor (use with ``async with`` or await its methods)."""
        return InlineCursor(self._conn.cursor())

    async def execute(self, sql: str, parameters: Sequence[Any] = ()) -> InlineCursor:
        """Run one statement on a new cursor."""
        return await self.cursor().execute(sql, parameters)

    async def commit(self) -> None:
        """As sqlite3."""
        self._conn.commit()

    async def rollback(self) -> None:
        """As sqlite3."""
        self._conn.rollback()

    async def close(self) -> None:
        """As sqlite3."""
        if self._connection is not None:
            self._connection = None
            self._conn.close()

    def stop(self) -> None:
        """Close at once (SQLAlchemy's terminate)."""
        if self._connection is not None:
            self._connection = None
            self._conn.close()

    async def create_function(self, *args: Any, **kwargs: Any) -> None:
        """As sqlite3."""
        self._conn.create_function(*args, **kwargs)


def creator(path: str) -> Any:
    """An ``async_creator`` for ``create_async_engine`` opening ``path``."""

    async def connect() -> InlineConnection:
        connection = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, cached_statements=256
        )
        return InlineConnection(connection)

    return connect
