"""The operation runner on both databases: an operation whose step fails unexpectedly is
ended as INTERNAL (its step's writes rolled back), and the runner goes on with the others
instead of trying the broken one forever; an administrator can run it again."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from server.domain.common.clock import SystemClock
from server.domain.common.errors import Code
from server.domain.common.ids import new_id
from server.domain.identity.model import Preferences, Role, Tier, User, UserState
from server.domain.operations.model import Operation, Step
from server.domain.operations.runner import OperationRunner
from server.domain.operations.service import OperationService
from server.domain.unit_of_work import UnitOfWork
from server.storage.database import Database
from tests.conftest import Backend, own_database


@pytest.fixture
async def db(backend: Backend, tmp_path: Path) -> AsyncIterator[Database]:
    async with own_database(backend, tmp_path) as own:
        database = Database(own.database_url, clock=SystemClock(), pool_size=2)
        try:
            yield database
        finally:
            await database.dispose()


async def operation(db: Database, kind: str) -> Operation:
    now = datetime.now(UTC)
    user = User(
        id=new_id("usr", now.timestamp()), email=f"{kind}-{now.timestamp()}@example.com",
        display_name="x", role=Role.USER, tier=Tier.FREE, state=UserState.ACTIVE,
        preferences=Preferences(), create_time=now, update_time=now,
    )  # fmt: skip
    made = Operation(
        id=new_id("opr", now.timestamp()), user_id=user.id, kind=kind, target="t", params={},
        create_time=now, update_time=now,
    )  # fmt: skip
    async with db() as uow:
        await uow.users.add(user, None)
        await uow.operations.add(made)
    return made


async def test_a_broken_operation_ends_as_internal_and_the_rest_go_on(db: Database) -> None:
    async def broken(uow: UnitOfWork, op: Operation) -> Step:
        await uow.operations.save(replace(op, cursor="half"))
        raise KeyError("a secrets key that is not configured")

    async def fine(uow: UnitOfWork, op: Operation) -> Step:
        return Step("end", 1, finished=True, result={"ok": True})

    runner = OperationRunner(db, SystemClock(), {"broken": broken, "fine": fine})
    first, second = await operation(db, "broken"), await operation(db, "fine")
    while await runner.run_once():
        pass
    service = OperationService(db, lister=None)  # type: ignore[arg-type]
    failed = await service.get(first.user_id, first.id)
    assert (failed.done, failed.error_code) == (True, Code.INTERNAL)
    assert failed.error_message == "a step failed (KeyError)"  # no detail of the cause
    assert failed.cursor == ""  # the step's own write was rolled back
    done = await service.get(second.user_id, second.id)
    assert (done.done, done.error_code, done.result) == (True, 0, {"ok": True})

    # Once the cause is fixed, it runs again from its cursor.
    again = await service.rerun(first.user_id, first.id, datetime.now(UTC), "fixed")
    assert not again.done
    fixed = OperationRunner(db, SystemClock(), {"broken": fine})
    while await fixed.run_once():
        pass
    assert (await service.get(first.user_id, first.id)).result == {"ok": True}
