"""Long-running operations (AIP-151): work that outlives the call that starts it.

An operation is a row: what to do (``kind``, ``params``), how far it got (``cursor``,
``processed`` of ``total``) and, once ``done``, its result or error. The replica working on
one holds a lease on it and renews it with each step; when a replica dies, the lease lapses
and another replica carries on from the cursor. Steps must therefore be idempotent or
commit their effect together with the cursor (they do: see
:class:`~server.domain.operations.runner.OperationRunner`).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from server.domain.audit import service as audit
from server.domain.audit.model import AuditTrail
from server.domain.common.errors import Code, FailedPrecondition, NotFound
from server.domain.common.listing import FilterField, Lister, ListSpec, OrderKey, Page
from server.domain.operations.model import Operation
from server.domain.unit_of_work import UnitOfWork, UnitOfWorkFactory

OPERATION_LIST_SPEC = ListSpec(
    filter_fields={
        "done": FilterField("bool"),
        "kind": FilterField("string"),
        "create_time": FilterField("timestamp"),
    },
    order_fields=frozenset({"create_time"}),
    default_order=(OrderKey("create_time", descending=True),),
)


class OperationService:
    """Reads of operations, and the runner's registry of kinds."""

    def __init__(self, uow: UnitOfWorkFactory, lister: Lister) -> None:
        self._uow = uow
        self._lister = lister

    async def get(self, owner_id: str, operation_id: str) -> Operation:
        """An operation of ``owner_id``."""
        async with self._uow(lag_tolerant=True) as uow:
            found = await uow.operations.get(operation_id)
        if found is None or found.user_id != owner_id:
            raise NotFound("operation", f"users/{owner_id}/operations/{operation_id}")
        return found

    async def cancel(
        self, owner_id: str, operation_id: str, now: datetime, trail: AuditTrail | None = None
    ) -> Operation:
        """End an unfinished operation with CANCELLED (a finished one is returned as it is).
        The runner's steps lock the row too, so a step never undoes a cancellation."""
        async with self._uow() as uow:
            found = await uow.operations.get(operation_id, lock=True)
            if found is None or found.user_id != owner_id:
                raise NotFound("operation", f"users/{owner_id}/operations/{operation_id}")
            await audit.record(uow, trail, now, subject_user_id=owner_id, resource=found.name)
            if found.done:
                return found
            cancelled = replace(
                found,
                done=True,
                error_code=Code.CANCELLED,
                error_message="the operation was cancelled",
                update_time=now,
                end_time=now,
                lease_until=None,
            )
            await uow.operations.save(cancelled)
        return cancelled

    async def rerun(
        self,
        owner_id: str,
        operation_id: str,
        now: datetime,
        reason: str,
        trail: AuditTrail | None = None,
    ) -> Operation:
        """Run a failed operation again from its cursor (an administrator's recovery).
        FAILED_PRECONDITION unless it ended with an error other than CANCELLED."""
        async with self._uow() as uow:
            found = await self._locked(uow, owner_id, operation_id)
            if not found.done or found.error_code in (0, Code.CANCELLED):
                raise FailedPrecondition(
                    "only an operation that failed can run again", reason="OPERATION_NOT_FAILED"
                )
            again = replace(
                found, done=False, error_code=0, error_message="", end_time=None,
                lease_until=None, update_time=now,
            )  # fmt: skip
            await uow.operations.save(again)
            await audit.record(
                uow, trail, now, subject_user_id=owner_id, resource=found.name, reason=reason,
                error=f"{Code(found.error_code).name}: {found.error_message}"[:300],
                cursor=found.cursor, processed=found.processed,
            )  # fmt: skip
        return again

    async def release_lease(
        self,
        owner_id: str,
        operation_id: str,
        now: datetime,
        reason: str,
        trail: AuditTrail | None = None,
    ) -> Operation:
        """Let go of the lease on an unfinished operation: another round takes it from its
        cursor, and the holder's next step, finding its lease gone, drops it.
        FAILED_PRECONDITION unless it is unfinished and leased."""
        async with self._uow() as uow:
            found = await self._locked(uow, owner_id, operation_id)
            if found.done or found.lease_until is None:
                raise FailedPrecondition(
                    "only an unfinished operation that a replica holds has a lease to release",
                    reason="OPERATION_NOT_LEASED",
                )
            released = replace(found, lease_until=None, update_time=now)
            await uow.operations.save(released)
            await audit.record(
                uow, trail, now, subject_user_id=owner_id, resource=found.name, reason=reason,
                lease_until=found.lease_until.isoformat(), processed=found.processed,
            )  # fmt: skip
        return released

    async def _locked(self, uow: UnitOfWork, owner_id: str, operation_id: str) -> Operation:
        found = await uow.operations.get(operation_id, lock=True)
        if found is None or found.user_id != owner_id:
            raise NotFound("operation", f"users/{owner_id}/operations/{operation_id}")
        return found

    async def list(
        self,
        owner_id: str,
        *,
        page_size: int,
        page_token: str,
        filter: str,  # noqa: A002 - the AIP field is called filter
    ) -> Page[Operation]:
        """The owner's operations, newest first."""
        query = self._lister.query(
            OPERATION_LIST_SPEC,
            page_size=page_size,
            page_token=page_token,
            filter=filter,
            order_by="",
            scope=f"owner={owner_id}",
        )
        async with self._uow(lag_tolerant=True) as uow:
            rows = await uow.operations.list(owner_id, query)
        return self._lister.page(query, rows, lambda o: (o.create_time, o.id))
