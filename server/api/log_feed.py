"""What a watch stream sends after its start: an owner's events in the event log's order,
after the last one it sent.

The bus only wakes the feed. Each wake reads the log (on the primary) after the last event
handed out, so a watcher gets events in the log's order, each once and with none missing,
whichever replica wrote them and whether or not the bus carried them: an event that a
replica could only deliver locally (Redis away), or that the bus lost (this replica was
not subscribed), is read from the log at the next wake, and the bus's reconnection wakes
every feed (:meth:`server.domain.events.bus.MemoryBus.interrupt_all`). The resume point a
watcher keeps (the last event id it got) therefore always has everything before it.

One bound remains: events are ordered by the time they were recorded, before their commit.
Two writes of one owner committed concurrently on two replicas can commit in the other
order; a feed that reads in between hands out the later one first and skips the earlier
one. One writer at a time per owner (a user's own client) never meets it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from server.domain.events.bus import SubscriptionInterruptedError
from server.domain.events.model import Event
from server.domain.events.ports import Subscription
from server.domain.events.service import EventLog
from server.domain.identity.suspension import ACCESS_EVENTS


class LogFeed:
    """One watch's events after :attr:`cursor`; see the module docstring."""

    def __init__(
        self,
        events: EventLog,
        subscription: Subscription,
        owner: str,
        covers: Callable[[Event], bool],
    ) -> None:
        self._events = events
        self._subscription = subscription
        self._owner = owner
        self._covers = covers
        self._wakes: AsyncIterator[Event] | None = None
        #: The last event handed out or passed over (``None``: from the log's start).
        self.cursor: Event | None = None

    async def start_at_newest(self) -> None:
        """Follow from the owner's newest event (read before the current state is sent:
        a change committed in between is sent again, never missed)."""
        self.cursor = await self._events.latest(self._owner)

    async def new(self) -> AsyncIterator[Event]:
        """The events the watch covers after the cursor, moving it on."""
        async for event in self._events.after(self._owner, self.cursor):
            self.cursor = event
            if self._covers(event):
                yield event

    async def wait(self) -> bool:
        """Until there may be new events (a covered event the bus carried, or the bus was
        interrupted), or the owner's access changed (suspended, deleted: the caller must
        check the watcher's credential again); False once the subscription has ended (the
        server is stopping).
        Raises :class:`~server.domain.events.bus.SubscriptionOverflowError` if the
        watcher fell too far behind."""
        while True:
            if self._wakes is None:
                self._wakes = aiter(self._subscription)
            try:
                event = await anext(self._wakes)
            except StopAsyncIteration:
                return False
            except SubscriptionInterruptedError:
                self._wakes = None  # the subscription goes on; iterate it afresh
                return True
            if event.type in ACCESS_EVENTS and event.subject == f"users/{self._owner}":
                return True  # the caller is checked again: a suspended owner's watch ends
            if self._covers(event) and not self._handed_out(event):
                return True

    def _handed_out(self, event: Event) -> bool:
        cursor = self.cursor
        return cursor is not None and (event.time, event.id) <= (cursor.time, cursor.id)
