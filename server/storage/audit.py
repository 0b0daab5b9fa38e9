"""The audit log."""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from server.domain.audit.model import AuditEntry
from server.domain.common.listing import ListQuery
from server.storage.base import Repository
from server.storage.query import apply_list_query
from server.storage.tables import audit_log

_a = audit_log.c
ACTIVITY_COLUMNS = {"action": _a.action, "outcome": _a.outcome, "create_time": _a.time}


def _entry(row: sa.RowMapping) -> AuditEntry:
    return AuditEntry(
        id=row["id"],
        time=row["time"],
        method=row["method"],
        action=row["action"],
        outcome=row["outcome"],
        request_id=row["request_id"],
        reason=row["reason"],
        actor_user_id=row["actor_user_id"],
        api_key_id=row["api_key_id"],
        subject_user_id=row["subject_user_id"],
        resource=row["resource"],
        ip_address=row["ip_address"],
        user_agent=row["user_agent"],
        details=dict(row["details"] or {}),
    )


def _row(entry: AuditEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "time": entry.time,
        "request_id": entry.request_id[:64],
        "method": entry.method[:200],
        "action": entry.action[:100],
        "outcome": entry.outcome,
        "reason": entry.reason[:100],
        "actor_user_id": entry.actor_user_id,
        "api_key_id": entry.api_key_id,
        "subject_user_id": entry.subject_user_id,
        "resource": entry.resource[:300],
        "ip_address": entry.ip_address[:64],
        "user_agent": entry.user_agent[:512],
        "details": entry.details,
    }


class SqlAuditRepository(Repository):
    """Audit entries in SQL."""

    async def add(self, entry: AuditEntry) -> None:
        await self._conn.execute(audit_log.insert().values(**_row(entry)))

    async def add_many(self, entries: Sequence[AuditEntry]) -> None:
        """Several entries in one statement."""
        if entries:
            await self._conn.execute(audit_log.insert(), [_row(e) for e in entries])

    async def set_outcome(self, entry_id: str, outcome: str, reason: str) -> bool:
        result = await self._conn.execute(
            sa.update(audit_log)
            .where(_a.id == entry_id)
            .values(outcome=outcome, reason=reason[:100])
        )
        return result.rowcount > 0

    async def list_for_user(self, user_id: str, query: ListQuery) -> builtins.list[AuditEntry]:
        stmt = sa.select(audit_log).where(_a.subject_user_id == user_id)
        stmt = apply_list_query(stmt, query, ACTIVITY_COLUMNS, _a.id)
        return [_entry(row) for row in await self._all(stmt)]

    async def erase_user(self, user_id: str) -> None:
        """Delete the user's own trail; keep others' entries but drop the user's id from them."""
        await self._conn.execute(sa.delete(audit_log).where(_a.subject_user_id == user_id))
        await self._conn.execute(
            sa.update(audit_log).where(_a.actor_user_id == user_id).values(actor_user_id="")
        )
