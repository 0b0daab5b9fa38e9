"""What the event log needs: storage for events, and a bus that fans committed events out
to subscribers on every replica.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Protocol

from server.domain.common.listing import ListQuery
from server.domain.events.model import Event


class EventRepository(Protocol):
    """The event log."""

    async def add(self, event: Event) -> None: ...
    async def list(self, user_id: str, query: ListQuery) -> builtins.list[Event]: ...
    async def get(self, event_id: str) -> Event | None: ...
    async def by_ids(self, event_ids: Sequence[str]) -> builtins.list[Event]: ...
    async def between(
        self, user_id: str, start: datetime, end: datetime, after_id: str, limit: int
    ) -> builtins.list[Event]: ...
    async def count_by_type(
        self, user_id: str, start: datetime, end: datetime
    ) -> dict[str, int]: ...


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
