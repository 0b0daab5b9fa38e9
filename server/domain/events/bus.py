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

    def interrupt_all(self) -> None:
        """Tell every subscription that events may have passed it by (the feed between
        replicas was lost for a while): each raises :class:`SubscriptionInterruptedError`
        once, so that its reader catches up from the event log."""
        for subscriptions in list(self._subscribers.values()):
            for subscription in list(subscriptions):
                subscription.interrupt()

    @property
    def subscriber_count(self) -> int:
        """Live subscriptions in this process."""
        return sum(len(s) for s in self._subscribers.values())


class SubscriptionLostError(Exception):
    """Events may have passed a subscription by; its reader must catch up from the event
    log (a watcher watches again with ``resume_after``). The subscription stays open:
    iterating it again goes on with the events that follow."""


class SubscriptionOverflowError(SubscriptionLostError):
    """A subscriber fell too far behind."""


class SubscriptionInterruptedError(SubscriptionLostError):
    """The feed between replicas (Redis) was lost for a while: events written on other
    replicas in between did not reach this one."""


class QueueSubscription:
    """A subscriber's bounded queue. If the consumer falls more than ``buffer`` events
    behind, iterating raises :class:`SubscriptionOverflowError` rather than the queue
    growing without bound; if the bus lost events, :class:`SubscriptionInterruptedError`."""

    def __init__(self, buffer: int, on_close: Any) -> None:
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(buffer)
        self._on_close = on_close
        self._overflowed = False
        self._interrupted = False

    def put(self, event: Event) -> None:
        """Queue ``event`` (called by the bus)."""
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self._overflowed = True
            self._mark()

    def end(self) -> None:
        """End the feed (the server is stopping)."""
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)
            return
        self._mark()

    def interrupt(self) -> None:
        """Events may have been lost before the ones queued from now on."""
        self._interrupted = True
        self._mark()

    def _mark(self) -> None:
        """Replace what is queued with the marker that makes the reader catch up: the
        events queued are older than what it will read from the log."""
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            event = await self._queue.get()
            if event is None:
                if self._overflowed:
                    self._overflowed = False
                    raise SubscriptionOverflowError
                if self._interrupted:
                    self._interrupted = False
                    raise SubscriptionInterruptedError
                return
            yield event

    async def close(self) -> None:
        self._on_close(self)
