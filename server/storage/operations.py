"""Long-running operations in SQL: claimed with ``FOR UPDATE SKIP LOCKED`` and a lease."""

from __future__ import annotations

import builtins
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from server.domain.common.listing import ListQuery
from server.domain.operations.model import Operation
from server.storage.base import Repository
from server.storage.query import apply_list_query
from server.storage.tables import operations

_o = operations.c

OPERATION_COLUMNS = {"done": _o.done, "kind": _o.kind, "create_time": _o.create_time}


def _operation(row: sa.RowMapping) -> Operation:
    return Operation(
        id=row["id"],
        user_id=row["user_id"],
        kind=row["kind"],
        target=row["target"],
        params=dict(row["params"]),
        create_time=row["create_time"],
        update_time=row["update_time"],
        cursor=row["cursor"],
        processed=row["processed"],
        total=row["total"],
        done=row["done"],
        result=row["result"],
        error_code=row["error_code"],
        error_message=row["error_message"],
        request_id=row["request_id"],
        lease_until=row["lease_until"],
        end_time=row["end_time"],
    )


def _operation_values(operation: Operation) -> dict[str, Any]:
    return {
        "cursor": operation.cursor,
        "processed": operation.processed,
        "total": operation.total,
        "done": operation.done,
        "result": None if operation.result is None else dict(operation.result),
        "error_code": int(operation.error_code),
        "error_message": operation.error_message,
        "lease_until": operation.lease_until,
        "update_time": operation.update_time,
        "end_time": operation.end_time,
    }


class SqlOperationRepository(Repository):
    """Long-running operations in SQL."""

    async def add(self, operation: Operation) -> None:
        values = _operation_values(operation) | {
            "id": operation.id,
            "user_id": operation.user_id,
            "kind": operation.kind,
            "target": operation.target,
            "params": dict(operation.params),
            "request_id": operation.request_id,
            "create_time": operation.create_time,
        }
        await self._insert(operations, values, "operation", operation.name)

    async def get(self, operation_id: str, *, lock: bool = False) -> Operation | None:
        stmt = sa.select(operations).where(_o.id == operation_id)
        row = await self._one(stmt.with_for_update() if lock else stmt)
        return None if row is None else _operation(row)

    async def find_by_request(self, user_id: str, request_id: str) -> Operation | None:
        row = await self._one(
            sa.select(operations).where(_o.user_id == user_id, _o.request_id == request_id)
        )
        return None if row is None else _operation(row)

    async def list(self, user_id: str, query: ListQuery) -> builtins.list[Operation]:
        stmt = sa.select(operations).where(_o.user_id == user_id)
        stmt = apply_list_query(stmt, query, OPERATION_COLUMNS, _o.id)
        return [_operation(r) for r in await self._all(stmt)]

    async def claim(self, now: datetime, lease_until: datetime) -> Operation | None:
        lapsed = (
            sa.select(_o.id)
            .where(
                _o.done.is_(False),
                sa.or_(_o.lease_until.is_(None), _o.lease_until <= now),
            )
            .order_by(_o.create_time)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        stmt = (
            sa.update(operations)
            .where(_o.id.in_(lapsed.scalar_subquery()))
            .values(lease_until=lease_until)
            .returning(*operations.c)
        )
        row = (await self._conn.execute(stmt)).mappings().first()
        return None if row is None else _operation(row)

    async def save(self, operation: Operation) -> None:
        await self._conn.execute(
            sa.update(operations)
            .where(_o.id == operation.id)
            .values(**_operation_values(operation))
        )
