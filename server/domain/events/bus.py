"""The in-process event bus (embedded mode): subscribers of this process only, each with
a bounded queue.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from server.domain.events.model import Event


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
