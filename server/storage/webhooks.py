"""Webhook endpoints, the delivery outbox with its attempts, and long-running operations.

Due deliveries are claimed with one ``UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP
LOCKED) RETURNING``: on PostgreSQL concurrent dispatchers skip each other's rows, and the
claim moves ``next_attempt_time`` past a lease, so a dispatcher that dies mid-send leaves its
rows to come due again (at least once). SQLite ignores the locking clause; its one writer
makes the statement atomic anyway.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from server.domain.delivery import Claimed, Finished
from server.domain.listing import ListQuery
from server.domain.operations import Operation
from server.domain.outbox import DeliveryState, NewDelivery, Receiver
from server.domain.webhook_service import Attempt, Delivery, DisabledReason, Webhook
from server.errors import Aborted, NotFound
from server.storage.base import Repository
from server.storage.query import apply_list_query
from server.storage.sealed_headers import open_headers, seal_headers
from server.storage.sealing import Sealer, SealError
from server.storage.tables import (
    operations,
    users,
    webhook_attempts,
    webhook_deliveries,
    webhooks,
)

log = logging.getLogger("tunnelplane.webhooks")
_w = webhooks.c
_d = webhook_deliveries.c
_a = webhook_attempts.c
_o = operations.c
WEBHOOK_COLUMNS = {
    "url": _w.url,
    "disabled_reason": _w.disabled_reason,
    "create_time": _w.create_time,
}
DELIVERY_COLUMNS = {
    "state": _d.state,
    "event_type": _d.event_type,
    "create_time": _d.create_time,
}
OPERATION_COLUMNS = {"done": _o.done, "kind": _o.kind, "create_time": _o.create_time}
_PENDING = DeliveryState.PENDING.value


def _mutable(webhook: Webhook, sealer: Sealer) -> dict[str, Any]:
    previous = webhook.previous_secret
    return {
        "url": webhook.url,
        "description": webhook.description,
        "event_types": list(webhook.event_types),
        "transform": webhook.transform,
        "rate_limit": webhook.rate_limit,
        "headers": {},  # never in the clear: sealed_headers (none: no headers)
        "sealed_headers": (
            seal_headers(webhook.headers, webhook.id, sealer) if webhook.headers else None
        ),
        "disabled_reason": webhook.disabled_reason.value,
        "secret": sealer.seal(webhook.secret, webhook.id),
        "previous_secret": None if previous is None else sealer.seal(previous, webhook.id),
        "previous_secret_expire_time": webhook.previous_secret_expire_time,
        "failing_since": webhook.failing_since,
        "version": webhook.version,
        "update_time": webhook.update_time,
    }


def _webhook(row: sa.RowMapping, sealer: Sealer) -> Webhook:
    previous = row["previous_secret"]
    return Webhook(
        id=row["id"],
        user_id=row["user_id"],
        url=row["url"],
        description=row["description"],
        event_types=tuple(row["event_types"]),
        transform=row["transform"],
        rate_limit=row["rate_limit"],
        headers=open_headers(row, sealer),
        disabled_reason=DisabledReason(row["disabled_reason"]),
        secret=sealer.open(row["secret"], row["id"]),
        previous_secret=None if previous is None else sealer.open(previous, row["id"]),
        previous_secret_expire_time=row["previous_secret_expire_time"],
        failing_since=row["failing_since"],
        version=row["version"],
        create_time=row["create_time"],
        update_time=row["update_time"],
        request_id=row["request_id"],
    )


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


class SqlWebhookRepository(Repository):
    """Endpoints, deliveries and attempts in SQL; signing secrets are stored sealed."""

    def __init__(self, conn: AsyncConnection, sealer: Sealer) -> None:
        super().__init__(conn)
        self._sealer = sealer

    async def get(self, webhook_id: str, *, lock: bool = False) -> Webhook | None:
        stmt = sa.select(webhooks).where(_w.id == webhook_id)
        row = await self._one(stmt.with_for_update() if lock else stmt)
        return None if row is None else _webhook(row, self._sealer)

    async def by_ids(self, webhook_ids: Sequence[str]) -> builtins.list[Webhook]:
        """The endpoints with these ids that open: a row whose sealed secret or headers no
        configured key opens (a wrong ``TP_SECRETS_KEY``) is logged and left out, so that
        it holds up only its own deliveries."""
        if not webhook_ids:
            return []
        found: builtins.list[Webhook] = []
        for row in await self._all(sa.select(webhooks).where(_w.id.in_(webhook_ids))):
            try:
                found.append(_webhook(row, self._sealer))
            except SealError as exc:
                log.warning(
                    "webhook endpoint does not open with the configured secrets keys",
                    extra={"webhook": row["id"], "error": str(exc)},
                )
        return found

    async def find_by_request(self, user_id: str, request_id: str) -> Webhook | None:
        row = await self._one(
            sa.select(webhooks).where(_w.user_id == user_id, _w.request_id == request_id)
        )
        return None if row is None else _webhook(row, self._sealer)

    async def count(self, user_id: str) -> int:
        stmt = sa.select(sa.func.count()).select_from(webhooks).where(_w.user_id == user_id)
        return int((await self._conn.execute(stmt)).scalar_one())

    async def lock_owner(self, user_id: str) -> None:
        """Serialise creates that check the per-owner limit (no-op on SQLite's one writer)."""
        await self._conn.execute(
            sa.select(users.c.id).where(users.c.id == user_id).with_for_update()
        )

    async def add(self, webhook: Webhook) -> None:
        values = _mutable(webhook, self._sealer) | {
            "id": webhook.id,
            "user_id": webhook.user_id,
            "request_id": webhook.request_id,
            "create_time": webhook.create_time,
        }
        await self._insert(webhooks, values, "webhook", webhook.name)

    async def save(self, webhook: Webhook, expected_version: int) -> None:
        """Write every mutable column; ``Aborted`` if the version moved meanwhile."""
        result = await self._conn.execute(
            sa.update(webhooks)
            .where(_w.id == webhook.id, _w.version == expected_version)
            .values(**_mutable(webhook, self._sealer))
        )
        if result.rowcount == 0:
            if await self.get(webhook.id) is None:
                raise NotFound("webhook", webhook.name)
            raise Aborted("the webhook was changed concurrently; retry", reason="CONCURRENT_UPDATE")

    async def delete(self, webhook_id: str) -> None:
        # Its deliveries and their attempts go with it (ON DELETE CASCADE; SQLite
        # connections turn foreign keys on).
        await self._conn.execute(sa.delete(webhooks).where(_w.id == webhook_id))

    async def list(self, user_id: str, query: ListQuery) -> builtins.list[Webhook]:
        stmt = sa.select(webhooks).where(_w.user_id == user_id)
        stmt = apply_list_query(stmt, query, WEBHOOK_COLUMNS, _w.id)
        return [_webhook(r, self._sealer) for r in await self._all(stmt)]

    async def seal_plain_headers(self, limit: int) -> int:
        """Seal the headers of up to ``limit`` rows that hold some in the clear (written
        before migration 0008, or by a tool); how many rows were looked at. A row saved
        meanwhile is left as that save wrote it; a row without headers needs no key."""
        stmt = (
            sa.select(_w.id, _w.headers)
            .where(_w.sealed_headers.is_(None), sa.cast(_w.headers, sa.Text) != "{}")
            .order_by(_w.id)
            .limit(limit)
        )
        rows = (await self._conn.execute(stmt)).all()
        for webhook_id, headers in rows:
            await self._conn.execute(
                sa.update(webhooks)
                .where(_w.id == webhook_id, _w.sealed_headers.is_(None))
                .values(
                    headers={},
                    sealed_headers=seal_headers(headers or {}, webhook_id, self._sealer),
                )
            )
        return len(rows)

    async def receivers(self, user_id: str) -> builtins.list[Receiver]:
        stmt = sa.select(_w.id, _w.event_types, _w.disabled_reason).where(_w.user_id == user_id)
        return [
            Receiver(r["id"], tuple(r["event_types"]), bool(r["disabled_reason"]))
            for r in await self._all(stmt)
        ]

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

    # -- the dispatcher's side ------------------------------------------------------------

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

    async def take_slots(
        self, webhook_id: str, count: int, now: datetime, interval: float, until: datetime
    ) -> builtins.list[datetime]:
        """The next ``count`` send times of the endpoint, ``interval`` apart from its
        theoretical arrival time (GCRA with a burst of one, shared by every replica through
        the endpoint's row); those at or before ``until`` are taken (sent now), the others
        are only told their turn, not reserved, so that a held-back delivery does not push
        itself further back."""
        tat = (
            await self._conn.execute(
                sa.select(_w.rate_tat).where(_w.id == webhook_id).with_for_update()
            )
        ).scalar_one_or_none()
        start = max(tat, now) if tat is not None else now
        step = timedelta(seconds=interval)
        slots = [start + step * i for i in range(count)]
        taken = sum(1 for slot in slots if slot <= until)
        if taken:
            await self._conn.execute(
                sa.update(webhooks).where(_w.id == webhook_id).values(rate_tat=start + step * taken)
            )
        return slots

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

    async def succeeded(self, webhook_ids: Sequence[str]) -> None:
        if webhook_ids:
            await self._conn.execute(
                sa.update(webhooks)
                .where(_w.id.in_(list(webhook_ids)), _w.failing_since.is_not(None))
                .values(failing_since=None)
            )

    async def failing(self, webhook_id: str, now: datetime) -> datetime:
        """Since when the endpoint fails (``now`` if it did not already)."""
        await self._conn.execute(
            sa.update(webhooks)
            .where(_w.id == webhook_id, _w.failing_since.is_(None))
            .values(failing_since=now)
        )
        since = (
            await self._conn.execute(sa.select(_w.failing_since).where(_w.id == webhook_id))
        ).scalar_one_or_none()
        return since or now

    async def disable(self, webhook_id: str, reason: DisabledReason, now: datetime) -> bool:
        """Disable an enabled endpoint; whether this call did."""
        result = await self._conn.execute(
            sa.update(webhooks)
            .where(_w.id == webhook_id, _w.disabled_reason == "")
            .values(disabled_reason=reason.value, version=_w.version + 1, update_time=now)
        )
        return bool(result.rowcount)

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
