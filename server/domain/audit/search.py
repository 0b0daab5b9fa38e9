"""ListAuditEntries and ExportAuditEntries: the whole audit log, searched with AIP-160
filters, a page at a time or streamed for export."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace

from server.domain.audit import service as audit
from server.domain.audit.model import AuditEntry, AuditTrail
from server.domain.audit.rules import ACTIVITY_LIST_SPEC
from server.domain.common.clock import Clock
from server.domain.common.errors import InvalidArgument
from server.domain.common.listing import (
    And,
    Compare,
    Expr,
    FilterField,
    Lister,
    ListQuery,
    ListSpec,
    Not,
    Or,
    OrderKey,
    Page,
)
from server.domain.unit_of_work import UnitOfWork, UnitOfWorkFactory

_STRING = FilterField("string")
AUDIT_LIST_SPEC = ListSpec(
    filter_fields={
        "actor": _STRING,
        "subject": _STRING,
        "action": _STRING,
        "method": _STRING,
        "outcome": _STRING,
        "reason": _STRING,
        "request_id": _STRING,
        "resource": _STRING,
        "ip_address": _STRING,
        "create_time": FilterField("timestamp"),
    },
    order_fields=frozenset({"create_time"}),
    default_order=(OrderKey("create_time", descending=True),),
)
#: Exports run oldest first.
OLDEST_FIRST = (OrderKey("create_time"),)
EXPORT_BATCH = 500


class AuditSearch:
    """Reads of the whole audit log."""

    def __init__(self, uow: UnitOfWorkFactory, lister: Lister, clock: Clock) -> None:
        self._uow = uow
        self._lister = lister
        self._clock = clock

    async def list(
        self,
        *,
        page_size: int,
        page_token: str,
        filter: str,  # noqa: A002 - the AIP field is called filter
    ) -> Page[AuditEntry]:
        """A page of entries, newest first."""
        query = self._lister.query(
            AUDIT_LIST_SPEC, page_size=page_size, page_token=page_token, filter=filter
        )
        async with self._uow(lag_tolerant=True) as uow:
            rows = await uow.audit.search(query)
        return self._lister.page(query, rows, lambda e: (e.time, e.id))

    async def export(
        self,
        filter: str,  # noqa: A002 - the AIP field is called filter
        trail: AuditTrail | None = None,
    ) -> AsyncIterator[AuditEntry]:
        """Every matching entry of the whole log, oldest first (see :meth:`_export`)."""
        return await self._export(
            AUDIT_LIST_SPEC, filter, trail, lambda uow, q: uow.audit.search(q)
        )

    async def export_activity(
        self,
        user_id: str,
        filter: str,  # noqa: A002
        trail: AuditTrail | None = None,
    ) -> AsyncIterator[AuditEntry]:
        """Every matching entry of a user's activity, oldest first."""
        return await self._export(
            ACTIVITY_LIST_SPEC,
            filter,
            trail,
            lambda uow, q: uow.audit.list_for_user(user_id, q),
            subject_user_id=user_id,
        )

    async def _export(
        self,
        spec: ListSpec,
        filter: str,  # noqa: A002
        trail: AuditTrail | None,
        read: Callable[[UnitOfWork, ListQuery], Awaitable[Sequence[AuditEntry]]],
        subject_user_id: str = "",
    ) -> AsyncIterator[AuditEntry]:
        """Matching entries read a batch at a time. The filter must bound the time
        (``create_time``): an export names what it exports, and is audited before the first
        entry goes out."""
        oldest_first = replace(spec, default_order=OLDEST_FIRST)
        query = self._lister.query(
            oldest_first, page_size=EXPORT_BATCH, page_token="", filter=filter
        )
        if query.filter is None or not _names(query.filter, "create_time"):
            example = 'create_time >= "2026-12-01T00:00:00Z"'
            raise InvalidArgument.single("filter", f"must bound create_time, for example {example}")
        async with self._uow() as uow:
            now = self._clock.now()
            await audit.record(uow, trail, now, subject_user_id=subject_user_id, filter=filter)
        return self._batches(query, read)

    async def _batches(
        self,
        query: ListQuery,
        read: Callable[[UnitOfWork, ListQuery], Awaitable[Sequence[AuditEntry]]],
    ) -> AsyncIterator[AuditEntry]:
        while True:
            async with self._uow(lag_tolerant=True) as uow:
                rows = await read(uow, query)
            for entry in rows[:EXPORT_BATCH]:
                yield entry
            if len(rows) <= EXPORT_BATCH:
                return
            last = rows[EXPORT_BATCH - 1]
            query = replace(query, after=(last.time, last.id))


def _names(expr: Expr, field: str) -> bool:
    """Whether ``expr`` compares ``field`` anywhere."""
    if isinstance(expr, Compare):
        return expr.field == field
    if isinstance(expr, Not):
        return _names(expr.item, field)
    assert isinstance(expr, And | Or)
    return any(_names(item, field) for item in expr.items)
