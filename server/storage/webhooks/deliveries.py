"""The delivery queue (the outbox) with its attempts, in SQL.

Due deliveries are claimed with one ``UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP
LOCKED) RETURNING``: on PostgreSQL concurrent dispatchers skip each other's rows, and the
claim moves ``next_attempt_time`` past a lease, so a dispatcher that dies mid-send leaves its
rows to come due again (at least once). SQLite ignores the locking clause; its one writer
makes the statement atomic anyway.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from server.domain.common.listing import ListQuery
from server.domain.webhooks.model import (
    Attempt,
    Claimed,
    Delivery,
    DeliveryState,
    Finished,
    NewDelivery,
)
from server.storage.base import Repository
from server.storage.query import apply_list_query
from server.storage.tables import webhook_attempts, webhook_deliveries, webhooks

_w = webhooks.c
_d = webhook_deliveries.c
_a = webhook_attempts.c

DELIVERY_COLUMNS = {
    "state": _d.state,
    "event_type": _d.event_type,
    "create_time": _d.create_time,
}

_PENDING = DeliveryState.PENDING.value

_FINISH = (
    sa.update(webhook_deliveries)
    .where(_d.id == sa.bindparam("b_id"))
    .values(state=sa.bindparam("b_state"), next_attempt_time=sa.bindparam("b_next"))
)


def _finish_row(finished: Finished) -> dict[str, Any]:
    return {
        "b_id": finished.delivery_id,
        "b_state": finished.state.value,
        "b_next": finished.next_attempt_time,
    }


def _attempt_row(delivery_id: str, attempt: Attempt) -> dict[str, Any]:
    return {
        "delivery_id": delivery_id,
        "number": attempt.number,
        "time": attempt.time,
        "status_code": attempt.status_code,
        "latency": attempt.latency,
        "response_excerpt": attempt.response_excerpt,
        "error": attempt.error,
        "succeeded": attempt.succeeded,
    }


def _attempt(row: sa.RowMapping) -> Attempt:
    return Attempt(
        row["number"],
        row["time"],
        row["status_code"],
        row["latency"],
        row["response_excerpt"],
        row["error"],
        row["succeeded"],
    )


def _within_limits(
    rows: Sequence[tuple[str, str]], limit: int, per_endpoint: int, busy: Mapping[str, int]
) -> builtins.list[str]:
    """The ids of ``rows`` (id, webhook id; longest due first) a claim takes."""
    if not per_endpoint:
        return [r[0] for r in rows[:limit]]
    taken: dict[str, int] = {}
    chosen: builtins.list[str] = []
    for delivery_id, webhook_id in rows:
        count = taken.get(webhook_id, busy.get(webhook_id, 0))
        if count < per_endpoint:
            chosen.append(delivery_id)
            taken[webhook_id] = count + 1
            if len(chosen) == limit:
                break
    return chosen


class SqlDeliveryQueue(Repository):
    """Deliveries and their attempts in SQL: queued, listed, claimed, finished."""

    async def add_deliveries(self, deliveries: Sequence[NewDelivery], now: datetime) -> None:
        await self._conn.execute(
            webhook_deliveries.insert(),
            [
                {
                    "id": d.id,
                    "webhook_id": d.webhook_id,
                    "event_id": d.event_id,
                    "event_type": d.event_type,
                    "state": d.state.value,
                    "attempt_count": 0,
                    "next_attempt_time": d.next_attempt_time,
                    "claim": 0,
                    "test": d.test,
                    "create_time": now,
                    "update_time": now,
                }
                for d in deliveries
            ],
        )

    async def deliveries(self, webhook_id: str, query: ListQuery) -> builtins.list[Delivery]:
        stmt = (
            sa.select(webhook_deliveries, webhooks.c.user_id)
            .join(webhooks, _w.id == _d.webhook_id)
            .where(_d.webhook_id == webhook_id)
        )
        rows = await self._all(apply_list_query(stmt, query, DELIVERY_COLUMNS, _d.id))
        return await self._with_attempts(rows)

    async def delivery(self, delivery_id: str) -> Delivery | None:
        stmt = (
            sa.select(webhook_deliveries, webhooks.c.user_id)
            .join(webhooks, _w.id == _d.webhook_id)
            .where(_d.id == delivery_id)
        )
        found = await self._with_attempts(await self._all(stmt))
        return found[0] if found else None

    async def _with_attempts(self, rows: Sequence[sa.RowMapping]) -> builtins.list[Delivery]:
        attempts: dict[str, list[Attempt]] = {r["id"]: [] for r in rows}
        if attempts:
            stmt = (
                sa.select(webhook_attempts)
                .where(_a.delivery_id.in_(list(attempts)))
                .order_by(_a.delivery_id, _a.number)
            )
            for a in await self._all(stmt):
                attempts[a["delivery_id"]].append(_attempt(a))
        return [
            Delivery(
                id=r["id"],
                webhook_id=r["webhook_id"],
                user_id=r["user_id"],
                event_id=r["event_id"],
                event_type=r["event_type"],
                state=DeliveryState(r["state"]),
                attempt_count=r["attempt_count"],
                next_attempt_time=r["next_attempt_time"],
                test=r["test"],
                create_time=r["create_time"],
                update_time=r["update_time"],
                attempts=tuple(attempts[r["id"]]),
            )
            for r in rows
        ]

    async def claim(
        self, now: datetime, lease_until: datetime, limit: int, token: int
    ) -> builtins.list[Claimed]:
        """Claim up to ``limit`` due deliveries, the longest due first."""
        claimed, _ = await self.claim_fairly(now, lease_until, limit, token)
        return claimed

    async def claim_fairly(
        self,
        now: datetime,
        lease_until: datetime,
        limit: int,
        token: int,
        *,
        per_endpoint: int = 0,
        busy: Mapping[str, int] | None = None,
    ) -> tuple[builtins.list[Claimed], bool]:
        """Claim up to ``limit`` due deliveries, the longest due first, and say whether
        nothing claimable was left behind. With ``per_endpoint``, an endpoint gets at most
        that many less what the caller already has in flight to it (``busy``), and
        endpoints with none left are not looked at, so that one endpoint's backlog never
        fills a claim."""
        busy = busy or {}
        scan = limit * 2 if per_endpoint else limit
        head = (
            sa.select(_d.id, _d.webhook_id)
            .where(_d.state == _PENDING, _d.next_attempt_time <= now)
            .order_by(_d.next_attempt_time)
            .limit(scan)
            .with_for_update(skip_locked=True)
        )
        if per_endpoint and (full := [w for w, n in busy.items() if n >= per_endpoint]):
            head = head.where(_d.webhook_id.not_in(sorted(full)))
        rows = [(r[0], r[1]) for r in await self._conn.execute(head)]
        chosen = _within_limits(rows, limit, per_endpoint, busy)
        # Fewer rows than looked for: every claimable one was seen; else those skipped
        # for their endpoint's limit may hide others further down.
        seen_all = len(rows) < scan and len(chosen) == len(rows)
        if not chosen:
            return [], len(rows) < scan
        stmt = (
            sa.update(webhook_deliveries)
            .where(_d.id.in_(chosen))
            .values(next_attempt_time=lease_until, claim=token)
            .returning(_d.id, _d.webhook_id, _d.event_id, _d.attempt_count, _d.test)
        )
        claimed = (await self._conn.execute(stmt)).all()
        return [Claimed(r[0], r[1], r[2], r[3], r[4], token) for r in claimed], seen_all

    async def claim_one(
        self, delivery_id: str, lease_until: datetime, token: int
    ) -> Claimed | None:
        stmt = (
            sa.update(webhook_deliveries)
            .where(_d.id == delivery_id, _d.state == _PENDING)
            .values(next_attempt_time=lease_until, claim=token)
            .returning(_d.id, _d.webhook_id, _d.event_id, _d.attempt_count, _d.test)
        )
        row = (await self._conn.execute(stmt)).first()
        return None if row is None else Claimed(row[0], row[1], row[2], row[3], row[4], token)

    async def release(self, delivery_id: str, token: int, at: datetime) -> None:
        await self._conn.execute(
            sa.update(webhook_deliveries)
            .where(_d.id == delivery_id, _d.claim == token)
            .values(next_attempt_time=at, claim=0)
        )

    async def finish(self, finished: Sequence[Finished], now: datetime) -> builtins.set[str]:
        """Record results whose claims still hold their deliveries (a claim that outlived
        its lease may have lost its delivery to another dispatcher); their ids. A few
        statements for the whole batch, not a few per delivery."""
        if not finished:
            return set()
        held: set[str] = set()
        for token in {f.token for f in finished}:
            ids = [f.delivery_id for f in finished if f.token == token]
            stmt = sa.select(_d.id).where(_d.id.in_(ids), _d.claim == token).with_for_update()
            held.update((await self._conn.execute(stmt)).scalars())
        kept = [f for f in finished if f.delivery_id in held]
        common = {"claim": 0, "update_time": now}
        tried = [f for f in kept if f.attempt is not None]
        untried = [f for f in kept if f.attempt is None]
        if tried:
            await self._conn.execute(
                _FINISH.values(**common, attempt_count=sa.bindparam("b_count")),
                [_finish_row(f) | {"b_count": f.attempt.number} for f in tried if f.attempt],
            )
            await self._conn.execute(
                webhook_attempts.insert(),
                [_attempt_row(f.delivery_id, f.attempt) for f in tried if f.attempt],
            )
        if untried:
            await self._conn.execute(_FINISH.values(**common), [_finish_row(f) for f in untried])
        return held

    async def fail_pending(self, webhook_id: str, now: datetime) -> int:
        result = await self._conn.execute(
            sa.update(webhook_deliveries)
            .where(_d.webhook_id == webhook_id, _d.state == _PENDING, _d.test.is_(False))
            .values(state=DeliveryState.FAILED.value, next_attempt_time=None, update_time=now)
        )
        return int(result.rowcount)

    async def recover(self, webhook_id: str, since: datetime, now: datetime) -> int:
        result = await self._conn.execute(
            sa.update(webhook_deliveries)
            .where(
                _d.webhook_id == webhook_id,
                _d.state == DeliveryState.FAILED.value,
                _d.test.is_(False),
                _d.create_time >= since,
            )
            .values(state=_PENDING, next_attempt_time=now, claim=0, update_time=now)
        )
        return int(result.rowcount)

    async def queue_stats(self, now: datetime) -> tuple[int, datetime | None]:
        """Due deliveries, and the due time of the oldest."""
        stmt = sa.select(sa.func.count(), sa.func.min(_d.next_attempt_time)).where(
            _d.state == _PENDING, _d.next_attempt_time <= now
        )
        count, oldest = (await self._conn.execute(stmt)).one()
        return int(count), oldest

    async def next_due(self, *, after: datetime | None = None) -> datetime | None:
        """When the next pending delivery is due (the next one due after ``after``)."""
        stmt = sa.select(sa.func.min(_d.next_attempt_time)).where(_d.state == _PENDING)
        if after is not None:
            stmt = stmt.where(_d.next_attempt_time > after)
        value: datetime | None = (await self._conn.execute(stmt)).scalar_one_or_none()
        return value
