"""The embedded SQLite database: how its connections are set up, and how concurrent units
of work share one file (writers queue, readers never wait for them)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import pytest_asyncio
import sqlalchemy as sa

from server.domain.common.clock import SystemClock
from server.domain.common.ids import new_id
from server.domain.identity.model import Preferences, Role, Tier, User, UserState
from server.storage.database import Database, make_engine
from tests.conftest import migrate

#: How a server's connections are set up (``PRAGMA name`` -> value).
PRAGMAS = {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": 2000, "synchronous": 1}


@pytest_asyncio.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'tunnelplane.db'}"
    await migrate(url)
    database = Database(url, clock=SystemClock(), pool_size=5)
    try:
        yield database
    finally:
        await database.dispose()


def a_user() -> User:
    now = datetime.now(UTC)
    user_id = new_id("usr")
    return User(
        user_id, f"{user_id}@example.com", "sqlite", Role.USER, Tier.FREE,
        UserState.ACTIVE, Preferences(), now, now,
    )  # fmt: skip


# The server's own driver, and the one the bench compares it with (bench/sqlite_ab.py):
# both set the connection up the same way, so the comparison is of the drivers alone.
@pytest.mark.parametrize("inline", [True, False], ids=["inline", "aiosqlite"])
async def test_every_connection_is_set_up_for_a_server(tmp_path: Path, inline: bool) -> None:
    engine = make_engine(
        f"sqlite:///{tmp_path / 'db.sqlite'}",
        pool_size=2,
        statement_timeout=10,
        sqlite_inline_driver=inline,
    )
    try:
        async with engine.connect() as conn:
            found = {
                name: (await conn.execute(sa.text(f"PRAGMA {name}"))).scalar() for name in PRAGMAS
            }
        assert found == PRAGMAS
    finally:
        await engine.dispose()


async def test_concurrent_writers_queue_instead_of_failing(db: Database) -> None:
    """Many write units of work open at once, each giving way to the others between its
    statements: SQLite allows one writer, so they must take turns, and all commit (none
    ends in "database is locked")."""
    users = [a_user() for _ in range(40)]

    async def add(user: User) -> None:
        async with db() as uow:
            await asyncio.sleep(0)  # let the others start their units of work
            await uow.users.add(user, None)
            await asyncio.sleep(0)

    await asyncio.gather(*(add(user) for user in users))
    async with db(readonly=True) as uow:
        found = [await uow.users.get(user.id) for user in users]
    assert [u.id if u else None for u in found] == [user.id for user in users]


async def test_a_read_does_not_wait_for_an_open_write(db: Database) -> None:
    """While a write unit of work is open (it holds SQLite's write lock), a read unit of
    work runs at once and sees the last committed state, not the write in progress."""
    committed, pending = a_user(), a_user()
    async with db() as uow:
        await uow.users.add(committed, None)
    async with db() as writer:
        await writer.users.add(pending, None)
        async with asyncio.timeout(5), db(readonly=True) as reader:  # a deadlock fails, not hangs
            assert await reader.users.get(committed.id) == committed
            assert await reader.users.get(pending.id) is None
    async with db(readonly=True) as reader:
        assert await reader.users.get(pending.id) == pending
