"""The event log: append-only facts written with the change they describe (an outbox).

An event is added in the unit of work of its change, so it exists if and only if the change
committed. Once committed it is published on the event bus, which fans it out to watch
streams on every replica (Redis pub/sub, or in-process without Redis).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from server.domain.common.clock import Clock
from server.domain.common.ids import new_id
from server.domain.common.listing import FilterField, Lister, ListQuery, ListSpec, OrderKey, Page
from server.domain.events.model import EVENT_TYPES, Event
from server.domain.events.ports import EventBus
from server.domain.unit_of_work import UnitOfWork, UnitOfWorkFactory
from server.domain.webhooks.outbox import queue_deliveries

EVENT_LIST_SPEC = ListSpec(
    filter_fields={
        "type": FilterField("string"),
        "subject": FilterField("string"),
        "create_time": FilterField("timestamp"),
    },
    order_fields=frozenset({"create_time"}),
    default_order=(OrderKey("create_time", descending=True),),
)
#: The order the log was written in: by time, then id.
LOG_ORDER = (OrderKey("create_time", descending=False),)


async def record(
    uow: UnitOfWork,
    bus: EventBus,
    clock: Clock,
    type_: str,
    *,
    subject: str,
    user_id: str,
    actor: str = "",
    payload: dict[str, Any] | None = None,
) -> Event:
    """Add an event in ``uow`` with its webhook deliveries (the outbox); it is published
    once (and only if) ``uow`` commits."""
    assert type_ in EVENT_TYPES, type_
    now = clock.now()
    event = Event(
        new_id("evt", now.timestamp()), type_, subject, user_id, actor, now, payload or {}
    )
    await uow.events.add(event)
    await queue_deliveries(uow, event)

    async def publish() -> None:
        await bus.publish(event)

    uow.after_commit(publish)
    return event


class EventLog:
    """Reads of the log."""

    def __init__(self, uow: UnitOfWorkFactory, lister: Lister) -> None:
        self._uow = uow
        self._lister = lister

    async def list(
        self,
        user_id: str,
        *,
        page_size: int,
        page_token: str,
        filter: str,  # noqa: A002 - the AIP field is called filter
    ) -> Page[Event]:
        """The owner's events, newest first."""
        query = self._lister.query(
            EVENT_LIST_SPEC,
            page_size=page_size,
            page_token=page_token,
            filter=filter,
            order_by="",
            scope=f"user={user_id}",
        )
        async with self._uow(lag_tolerant=True) as uow:
            rows = await uow.events.list(user_id, query)
        return self._lister.page(query, rows, lambda e: (e.time, e.id))

    async def get(self, user_id: str, event_id: str, *, fresh: bool = False) -> Event | None:
        """One of the owner's events (``None`` if it is not, or no longer, in the log).
        ``fresh``: from the primary (a watcher resuming after an event it has just been
        sent, which a replica may not have yet)."""
        async with self._uow(lag_tolerant=not fresh) as uow:
            event = await uow.events.get(event_id)
        return event if event is not None and event.user_id == user_id else None

    async def latest(self, user_id: str) -> Event | None:
        """The owner's newest event, where a watch that sends the current state starts
        following the log. Read as the current state is (a replica, if close enough), and
        before it: a change in between is sent again, never missed."""
        query = ListQuery(1, (OrderKey("create_time", descending=True),), None, None, "")
        async with self._uow(lag_tolerant=True) as uow:
            rows = await uow.events.list(user_id, query)
        return rows[0] if rows else None

    async def after(
        self, user_id: str, event: Event | None, batch: int = 500
    ) -> AsyncIterator[Event]:
        """The owner's events after ``event`` (from the first if ``None``) in the log's
        order (time, then id), read from the primary a batch at a time."""
        cursor: tuple[Any, ...] | None = None if event is None else (event.time, event.id)
        while True:
            query = ListQuery(batch, LOG_ORDER, None, cursor, fingerprint="")
            async with self._uow(readonly=True) as uow:
                rows = await uow.events.list(user_id, query)  # up to batch + 1
            for found in rows[:batch]:
                yield found
            if len(rows) <= batch:
                return
            cursor = (rows[batch - 1].time, rows[batch - 1].id)
