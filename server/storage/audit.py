"""The audit log."""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from server.domain.audit.model import AuditEntry
from server.domain.audit.rules import ChainedRow, chain_day, content_hash, genesis, link
from server.domain.common.listing import ListQuery
from server.storage.base import Repository
from server.storage.query import apply_list_query
from server.storage.tables import audit_chain_heads, audit_log

_a = audit_log.c
ACTIVITY_COLUMNS = {"action": _a.action, "outcome": _a.outcome, "create_time": _a.time}
SEARCH_COLUMNS = {
    **ACTIVITY_COLUMNS,
    "actor": _a.actor_user_id,
    "subject": _a.subject_user_id,
    "method": _a.method,
    "reason": _a.reason,
    "request_id": _a.request_id,
    "resource": _a.resource,
    "ip_address": _a.ip_address,
}


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
        chain_day=row["chain_day"] or "",
        chain_seq=int(row["chain_seq"] or 0),
        hash=row["hash"] or "",
        erased=bool(row["erased"]),
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
    """Audit entries in SQL, each chained to the one before it (one chain per UTC day)."""

    async def add(self, entry: AuditEntry) -> None:
        await self.add_many([entry])

    async def add_many(self, entries: Sequence[AuditEntry]) -> None:
        """Append entries, in order, to their days' chains (taking each day's head row
        for the rest of the transaction: appends to one day are serialized)."""
        rows = [_row(e) for e in entries]
        days: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            days.setdefault(chain_day(row["time"]), []).append(row)
        for day, day_rows in days.items():
            seq, previous = await self._head(day)
            for row in day_rows:
                seq += 1
                content = content_hash(row)
                current = link(previous, seq, content)
                row.update(
                    chain_day=day,
                    chain_seq=seq,
                    prev_hash=previous,
                    content_hash=content,
                    hash=current,
                )
                previous = current
            await self._conn.execute(
                sa.update(audit_chain_heads)
                .where(audit_chain_heads.c.day == day)
                .values(seq=seq, hash=previous)
            )
        if rows:
            await self._conn.execute(audit_log.insert(), rows)

    async def exists(self, entry_id: str) -> bool:
        return await self._one(sa.select(_a.id).where(_a.id == entry_id)) is not None

    async def _head(self, day: str) -> tuple[int, str]:
        """The day's head, locked; made at the day's first entry (one statement otherwise)."""
        locked = (
            sa.select(audit_chain_heads.c.seq, audit_chain_heads.c.hash)
            .where(audit_chain_heads.c.day == day)
            .with_for_update()
        )
        row = await self._one(locked)
        if row is None:
            await self._conn.execute(
                self._insert_stmt(audit_chain_heads)
                .values(day=day, seq=0, hash=genesis(day))
                .on_conflict_do_nothing(index_elements=[audit_chain_heads.c.day])
            )
            row = await self._one(locked)
        assert row is not None
        return int(row["seq"]), str(row["hash"])

    async def heads(self, start: str, end: str) -> dict[str, tuple[int, str]]:
        """Each day's head in [start, end] (``YYYY-MM-DD``)."""
        h = audit_chain_heads.c
        stmt = sa.select(h.day, h.seq, h.hash).where(h.day >= start, h.day <= end)
        return {row["day"]: (int(row["seq"]), row["hash"]) for row in await self._all(stmt)}

    async def chain_days(self, start: str, end: str) -> builtins.list[str]:
        """The days in [start, end] that have chained entries."""
        stmt = (
            sa.select(_a.chain_day)
            .where(_a.chain_day >= start, _a.chain_day <= end)
            .group_by(_a.chain_day)
        )
        return [str(day) for day in (await self._conn.execute(stmt)).scalars()]

    async def chained(self, day: str, after_seq: int, limit: int) -> builtins.list[ChainedRow]:
        """A day's entries after ``after_seq``, in chain order."""
        stmt = (
            sa.select(audit_log)
            .where(_a.chain_day == day, _a.chain_seq > after_seq)
            .order_by(_a.chain_seq)
            .limit(limit)
        )
        return [
            ChainedRow(
                id=row["id"],
                day=day,
                seq=int(row["chain_seq"]),
                prev_hash=row["prev_hash"],
                content_hash=row["content_hash"],
                hash=row["hash"],
                erased=bool(row["erased"]),
                fields={**row, "details": dict(row["details"] or {})},
            )
            for row in await self._all(stmt)
        ]

    async def unchained(self, start: datetime, end: datetime) -> int:
        """Entries in [start, end) written before the chain existed."""
        stmt = sa.select(sa.func.count()).where(
            _a.chain_seq.is_(None), _a.time >= start, _a.time < end
        )
        return int((await self._conn.execute(stmt)).scalar_one())

    async def search(self, query: ListQuery) -> builtins.list[AuditEntry]:
        """Entries matching ``query``, across the whole log."""
        stmt = apply_list_query(sa.select(audit_log), query, SEARCH_COLUMNS, _a.id)
        return [_entry(row) for row in await self._all(stmt)]

    async def list_for_user(self, user_id: str, query: ListQuery) -> builtins.list[AuditEntry]:
        stmt = sa.select(audit_log).where(_a.subject_user_id == user_id)
        stmt = apply_list_query(stmt, query, ACTIVITY_COLUMNS, _a.id)
        return [_entry(row) for row in await self._all(stmt)]

    async def erase_user(self, user_id: str) -> None:
        """Erase what the log says of the user: the entries about them and the ones they
        made keep their place in the chain (and their chained columns) but lose every
        personal field; they are marked erased, which is all the append-only guard lets
        an UPDATE do."""
        erased = {
            "ip_address": "",
            "user_agent": "",
            "details": {},
            "resource": "",
            "subject_user_id": "",
            "actor_user_id": "",
            "api_key_id": "",
            "erased": True,
        }
        await self._conn.execute(
            sa.update(audit_log)
            .where(sa.or_(_a.subject_user_id == user_id, _a.actor_user_id == user_id))
            .values(**erased)
        )
