"""The operation runner: carries unfinished operations forward, a step at a time, on any
replica (:meth:`OperationRunner.run_once` is one step; the loop around it is a worker,
:func:`server.workers.operations.operations_loop`).

The replica working on an operation holds a lease on it and renews it with each step;
when a replica dies, the lease lapses and another replica carries on from the cursor.
Each step commits its effect together with the cursor, in one unit of work.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from datetime import timedelta

from server.domain.common.clock import Clock
from server.domain.common.errors import Code, DomainError, Unavailable
from server.domain.operations.model import Operation, Step
from server.domain.unit_of_work import UnitOfWork, UnitOfWorkFactory

log = logging.getLogger("tunnelplane.operations")
#: Runs one step of an operation inside the unit of work that also saves its progress.
StepFn = Callable[[UnitOfWork, Operation], Awaitable[Step]]


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
        self._current: Operation | None = None

    async def run_once(self) -> bool:
        """Run one step: of the operation this runner holds, or else of one whose lease
        lapsed (claimed now); whether there was one."""
        if self._current is None:
            now = self._clock.now()
            async with self._uow() as uow:
                self._current = await uow.operations.claim(now, now + self._lease)
            if self._current is None:
                return False
        try:
            stepped = await self._step(self._current)
        except Unavailable:
            raise  # a dependency is down: the same step is tried again later
        except Exception as exc:  # noqa: BLE001 - one broken operation must not stop the rest
            stepped = await self._fail(self._current, exc)
        self._current = stepped if stepped is not None and not stepped.done else None
        return True

    async def _fail(self, operation: Operation, exc: Exception) -> Operation | None:
        """A step failed unexpectedly (its own writes rolled back): end the operation as
        INTERNAL, so that the runner goes on with the others; an administrator can run it
        again (``RerunOperation``) once the cause is fixed."""
        log.error(
            "operation step failed",
            exc_info=exc,
            extra={"operation": operation.name, "kind": operation.kind},
        )
        async with self._uow() as uow:
            current = await uow.operations.get(operation.id, lock=True)
            if current is None or current.done or current.lease_until != operation.lease_until:
                return None
            now = self._clock.now()
            failed = replace(
                current, done=True, error_code=Code.INTERNAL,
                error_message=f"a step failed ({type(exc).__name__})", update_time=now,
                end_time=now, lease_until=None,
            )  # fmt: skip
            await uow.operations.save(failed)
        return failed

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
