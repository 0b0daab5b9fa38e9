"""Long-running operations (AIP-151): work that outlives the call that starts it.

An operation is a row: what to do (``kind``, ``params``), how far it got (``cursor``,
``processed`` of ``total``) and, once ``done``, its result or error. The replica working on
one holds a lease on it and renews it with each step; when a replica dies, the lease lapses
and another replica carries on from the cursor. Steps must therefore be idempotent or
commit their effect together with the cursor (they do: see :class:`OperationRunner`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from server.domain import audit
from server.domain.clock import Clock
from server.domain.ids import is_id
from server.domain.listing import FilterField, Lister, ListSpec, OrderKey, Page
from server.domain.names import user_id_of
from server.domain.ports import UnitOfWork, UnitOfWorkFactory
from server.errors import Code, DomainError, InvalidArgument, NotFound

log = logging.getLogger("tunnelplane.operations")

OPERATION_LIST_SPEC = ListSpec(
    filter_fields={
        "done": FilterField("bool"),
        "kind": FilterField("string"),
        "create_time": FilterField("timestamp"),
    },
    order_fields=frozenset({"create_time"}),
    default_order=(OrderKey("create_time", descending=True),),
)


@dataclass(frozen=True, slots=True)
class Operation:
    """A piece of long work."""

    id: str
    user_id: str
    kind: str
    target: str
    params: Mapping[str, Any]
    create_time: datetime
    update_time: datetime
    cursor: str = ""
    processed: int = 0
    total: int = 0
    done: bool = False
    result: Mapping[str, Any] | None = None
    error_code: int = 0
    error_message: str = ""
    request_id: str | None = None
    lease_until: datetime | None = None
    end_time: datetime | None = None

    @property
    def name(self) -> str:
        """``users/{user}/operations/{operation}``."""
        return f"users/{self.user_id}/operations/{self.id}"


@dataclass(frozen=True, slots=True)
class Step:
    """What one step of an operation did: the new cursor, items done, and whether the
    work is finished (then ``result`` is its response)."""

    cursor: str
    processed: int
    finished: bool
    result: Mapping[str, Any] | None = None


#: Runs one step of an operation inside the unit of work that also saves its progress.
StepFn = Callable[[UnitOfWork, Operation], Awaitable[Step]]


def operation_parts(name: str, field_name: str, caller_id: str | None) -> tuple[str, str]:
    """(owner id, operation id) of ``users/{user}/operations/{operation}``."""
    parts = name.split("/")
    if len(parts) != 4 or parts[2] != "operations":
        raise InvalidArgument.single(
            field_name, "must look like users/{user}/operations/{operation}"
        )
    owner = user_id_of("/".join(parts[:2]), field_name, caller_id)
    if not is_id(parts[3], "opr"):
        raise InvalidArgument.single(field_name, "is not a valid operation id")
    return owner, parts[3]


class OperationService:
    """Reads of operations, and the runner's registry of kinds."""

    def __init__(self, uow: UnitOfWorkFactory, lister: Lister) -> None:
        self._uow = uow
        self._lister = lister

    async def get(self, owner_id: str, operation_id: str) -> Operation:
        """An operation of ``owner_id``."""
        async with self._uow(readonly=True) as uow:
            found = await uow.operations.get(operation_id)
        if found is None or found.user_id != owner_id:
            raise NotFound("operation", f"users/{owner_id}/operations/{operation_id}")
        return found

    async def cancel(self, owner_id: str, operation_id: str, now: datetime) -> Operation:
        """End an unfinished operation with CANCELLED (a finished one is returned as it is).
        The runner's steps lock the row too, so a step never undoes a cancellation."""
        async with self._uow() as uow:
            found = await uow.operations.get(operation_id, lock=True)
            if found is None or found.user_id != owner_id:
                raise NotFound("operation", f"users/{owner_id}/operations/{operation_id}")
            audit.annotate(subject_user_id=owner_id, resource=found.name)
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
        async with self._uow(readonly=True) as uow:
            rows = await uow.operations.list(owner_id, query)
        return self._lister.page(query, rows, lambda o: (o.create_time, o.id))


class OperationRunner:
    """Carries unfinished operations forward, a step at a time, on any replica."""

    def __init__(
        self,
        uow: UnitOfWorkFactory,
        clock: Clock,
        steps: Mapping[str, StepFn],
        *,
        lease: float = 30.0,
    ) -> None:
        self._uow = uow
        self._clock = clock
        self._steps = steps
        self._lease = timedelta(seconds=lease)
        self._wake = asyncio.Event()
        self._current: Operation | None = None

    def wake(self) -> None:
        """Look for work now (an operation was just started)."""
        self._wake.set()

    async def run_once(self) -> bool:
        """Run one step: of the operation this runner holds, or else of one whose lease
        lapsed (claimed now); whether there was one."""
        if self._current is None:
            now = self._clock.now()
            async with self._uow() as uow:
                self._current = await uow.operations.claim(now, now + self._lease)
            if self._current is None:
                return False
        stepped = await self._step(self._current)
        self._current = stepped if stepped is not None and not stepped.done else None
        return True

    async def _step(self, operation: Operation) -> Operation | None:
        step_fn = self._steps.get(operation.kind)
        async with self._uow() as uow:
            current = await uow.operations.get(operation.id, lock=True)
            if current is None or current.done or current.lease_until != operation.lease_until:
                return None  # deleted, finished, or taken over by another replica
            now = self._clock.now()
            if step_fn is None:
                step = Step(current.cursor, 0, finished=True)
                changed = replace(
                    current, error_code=Code.UNIMPLEMENTED, error_message="unknown operation kind"
                )
            else:
                try:
                    step = await step_fn(uow, current)
                except DomainError as exc:  # for good: the work cannot go on
                    step = Step(current.cursor, 0, finished=True)
                    changed = replace(current, error_code=exc.code, error_message=str(exc)[:300])
                else:
                    changed = replace(current, result=step.result)
            changed = replace(
                changed,
                cursor=step.cursor,
                processed=current.processed + step.processed,
                done=step.finished,
                update_time=now,
                end_time=now if step.finished else None,
                lease_until=None if step.finished else now + self._lease,
            )
            await uow.operations.save(changed)
        return changed

    async def run(self, poll_interval: float) -> None:
        """Run operations until cancelled; errors are logged and retried after a pause."""
        while True:
            self._wake.clear()  # before the step: a start during it wakes the next
            try:
                busy = await self.run_once()
            except Exception:
                log.exception("running an operation failed; will retry")
                busy = False
            if busy:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll_interval):
                    await self._wake.wait()
