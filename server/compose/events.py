"""Events: the event log, and the bus that carries committed events to this process's
watchers and dispatcher (through Redis, so that every replica hears every event)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from server.compose.infrastructure import Infrastructure
from server.domain.events.bus import MemoryBus
from server.domain.events.service import EventLog
from server.storage.bus import RedisBus
from server.workers.events import bus_loop
from server.workers.supervisor import Loop

log = logging.getLogger("tunnelplane.events")


@dataclass
class EventsArea:
    """The event log and the buses."""

    #: This process's subscribers (watch streams, the dispatcher).
    local_bus: MemoryBus
    #: Where events are published: Redis when there is one, else the local bus.
    bus: MemoryBus | RedisBus
    log: EventLog

    def loops(self) -> Sequence[Loop]:
        """The Redis subscription's reader, when there is Redis."""
        return [bus_loop(self.bus)] if isinstance(self.bus, RedisBus) else []

    async def ready(self, within: float) -> None:
        """Wait (a little) for the Redis subscription, so that a replica that says it is
        serving also hears the other replicas' events; without Redis there is nothing to
        wait for, and a Redis that is down does not hold the start up."""
        if isinstance(self.bus, RedisBus):
            try:
                async with asyncio.timeout(within):
                    await self.bus.wait_connected()
            except TimeoutError:
                log.warning("event bus not subscribed yet; watchers hear this replica only")

    def end_streams(self) -> None:
        """End every watch stream of this process (the server is stopping)."""
        self.local_bus.end_all()

    async def aclose(self) -> None:
        """Release the reader's connections."""
        if isinstance(self.bus, RedisBus):
            await self.bus.close()


def build(infra: Infrastructure) -> EventsArea:
    """The buses over ``infra``'s Redis (if any) and the log over its database."""
    local = MemoryBus()
    bus: MemoryBus | RedisBus = local
    if infra.redis is not None:
        bus = RedisBus(infra.redis, infra.settings.redis_prefix, local)
    return EventsArea(local, bus, EventLog(infra.db, infra.lister))
