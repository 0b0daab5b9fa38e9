"""Webhook endpoints in SQL; their signing secrets and headers are stored sealed.

One repository serves ``uow.webhooks``: the endpoints here, and the queue of their
deliveries it inherits from :class:`~server.storage.webhooks.deliveries.SqlDeliveryQueue`.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from server.domain.common.listing import ListQuery
from server.domain.webhooks.model import DisabledReason, Receiver, Webhook
from server.storage.query import apply_list_query
from server.storage.sealing import Sealer, SealError
from server.storage.tables import users, webhooks
from server.storage.webhooks.deliveries import SqlDeliveryQueue
from server.storage.webhooks.sealed_headers import open_headers, seal_headers

log = logging.getLogger("tunnelplane.webhooks")
_w = webhooks.c

WEBHOOK_COLUMNS = {
    "url": _w.url,
    "disabled_reason": _w.disabled_reason,
    "create_time": _w.create_time,
}


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


class SqlWebhookRepository(SqlDeliveryQueue):
    """Endpoints in SQL (signing secrets and headers sealed), with their delivery queue."""

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
        values = _mutable(webhook, self._sealer)
        await self._update_versioned(
            webhooks, webhook.id, expected_version, values, "webhook", webhook.name
        )

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
