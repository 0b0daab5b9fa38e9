"""The event log: append-only facts written with the change they describe (an outbox).

An event is added in the unit of work of its change, so it exists if and only if the change
committed. Once committed it is published on the event bus, which fans it out to watch
streams on every replica (Redis pub/sub, or in-process without Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from server.domain import audit
from server.domain.clock import Clock
from server.domain.ids import new_id
from server.domain.listing import FilterField, Lister, ListQuery, ListSpec, OrderKey, Page
from server.domain.outbox import queue_deliveries
from server.domain.ports import UnitOfWork, UnitOfWorkFactory

log = logging.getLogger(__name__)

#: Every type the log holds; webhooks may subscribe to these (and to prefixes).
EVENT_TYPES = frozenset(
    {
        "user.created",
        "user.tier_changed",
        "user.deleted",
        "tunnel.created",
        "tunnel.updated",
        "tunnel.status_changed",
        "tunnel.health_changed",
        "tunnel.failover",
        "tunnel.deleted",
        "endpoint.disabled",
        "webhook.test",
    }
)

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


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened to a user's resource."""

    id: str
    type: str
    subject: str
    user_id: str  # the owner of the subject
    actor: str  # users/{user}, or "" for the system
    time: datetime
    payload: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """``users/{user}/events/{event}``."""
        return f"users/{self.user_id}/events/{self.id}"


class EventBus(Protocol):
    """Fans committed events out to subscribers on every replica."""

    async def publish(self, event: Event) -> None:
        """Deliver ``event`` to every current subscriber of its owner (best effort)."""
        ...

    def subscribe(self, user_id: str) -> Subscription:
        """Events of ``user_id``'s resources from now on."""
        ...


class Subscription(Protocol):
    """A live feed of events; close it when done."""

    def __aiter__(self) -> AsyncIterator[Event]: ...
    async def close(self) -> None: ...


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


def current_actor() -> str:
    """The caller of the audited call being served, as an event's actor ("" if unknown)."""
    scope = audit.current()
    return f"users/{scope.actor_user_id}" if scope is not None and scope.actor_user_id else ""


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
        async with self._uow(readonly=True) as uow:
            rows = await uow.events.list(user_id, query)
        return self._lister.page(query, rows, lambda e: (e.time, e.id))

    async def get(self, user_id: str, event_id: str) -> Event | None:
        """One of the owner's events (``None`` if it is not, or no longer, in the log)."""
        async with self._uow(readonly=True) as uow:
            event = await uow.events.get(event_id)
        return event if event is not None and event.user_id == user_id else None

    async def after(self, event: Event, batch: int = 500) -> AsyncIterator[Event]:
        """Its owner's events after ``event`` in the log's order (time, then id), read a
        batch at a time."""
        cursor: tuple[Any, ...] = (event.time, event.id)
        while True:
            query = ListQuery(batch, LOG_ORDER, None, cursor, fingerprint="")
            async with self._uow(readonly=True) as uow:
                rows = await uow.events.list(event.user_id, query)  # up to batch + 1
            for found in rows[:batch]:
                yield found
            if len(rows) <= batch:
                return
            cursor = (rows[batch - 1].time, rows[batch - 1].id)


class MemoryBus:
    """The in-process bus: subscribers of this process only (embedded mode)."""

    def __init__(self, buffer: int = 256) -> None:
        self._subscribers: dict[str, set[QueueSubscription]] = {}
        self._buffer = buffer
        self._listeners: list[Callable[[Event], None]] = []

    def listen(self, listener: Callable[[Event], None]) -> None:
        """Call ``listener`` with every event this process hears (whoever's it is); it
        must be quick and must not raise (the webhook dispatcher wakes up this way)."""
        self._listeners.append(listener)

    async def publish(self, event: Event) -> None:
        self.deliver(event)

    def deliver(self, event: Event) -> None:
        """Hand ``event`` to this process's subscribers of its owner, and its listeners."""
        for subscription in list(self._subscribers.get(event.user_id, ())):
            subscription.put(event)
        for listener in self._listeners:
            listener(event)

    def subscribe(self, user_id: str) -> QueueSubscription:
        subscription = QueueSubscription(self._buffer, lambda s: self._remove(user_id, s))
        self._subscribers.setdefault(user_id, set()).add(subscription)
        return subscription

    def _remove(self, user_id: str, subscription: QueueSubscription) -> None:
        found = self._subscribers.get(user_id)
        if found is not None:
            found.discard(subscription)
            if not found:
                del self._subscribers[user_id]

    def end_all(self) -> None:
        """End every subscription (the server is stopping): watch streams finish."""
        for subscriptions in list(self._subscribers.values()):
            for subscription in list(subscriptions):
                subscription.end()

    @property
    def subscriber_count(self) -> int:
        """Live subscriptions in this process."""
        return sum(len(s) for s in self._subscribers.values())


class SubscriptionOverflowError(Exception):
    """A subscriber fell too far behind; it must resynchronise (watch again)."""


class QueueSubscription:
    """A subscriber's bounded queue. If the consumer falls more than ``buffer`` events
    behind, the subscription ends with :class:`SubscriptionOverflowError` rather than grow
    without bound."""

    def __init__(self, buffer: int, on_close: Any) -> None:
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(buffer)
        self._on_close = on_close
        self._overflowed = False

    def put(self, event: Event) -> None:
        """Queue ``event`` (called by the bus)."""
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self._overflowed = True
            with contextlib.suppress(asyncio.QueueEmpty):
                self._queue.get_nowait()
            self._queue.put_nowait(None)

    def end(self) -> None:
        """End the feed (the server is stopping)."""
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            event = await self._queue.get()
            if event is None:
                if self._overflowed:
                    raise SubscriptionOverflowError
                return
            yield event

    async def close(self) -> None:
        self._on_close(self)
