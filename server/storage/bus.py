"""The event bus across replicas: Redis pub/sub in front of the in-process bus.

Every replica publishes committed events on one Redis channel and reads that channel with
one subscription, handing each event to its own watchers (:class:`MemoryBus`). A replica
therefore sees its own events through Redis too, in the same order as everyone else. While
Redis is unreachable, events still reach this replica's watchers directly, and the reader
subscribes again with back-off. Pub/sub keeps nothing for a reader that is away, so once
subscribed again the reader interrupts every local subscription: each catches up from the
event log (a watch stream ends with ``UNAVAILABLE``, and its client resumes with
``resume_after``; an agent's stream reads its tunnel again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime
from typing import Any

import orjson
from redis.asyncio import Redis

from server.domain.events.bus import MemoryBus, QueueSubscription
from server.domain.events.model import Event

log = logging.getLogger("tunnelplane.bus")


def encode(event: Event) -> bytes:
    """The wire form of an event."""
    return orjson.dumps(
        {
            "id": event.id,
            "type": event.type,
            "subject": event.subject,
            "user_id": event.user_id,
            "actor": event.actor,
            "time": event.time.isoformat(),
            "payload": event.payload,
        }
    )


def decode(data: bytes) -> Event:
    """An event from its wire form."""
    raw: dict[str, Any] = orjson.loads(data)
    return Event(
        raw["id"],
        raw["type"],
        raw["subject"],
        raw["user_id"],
        raw["actor"],
        datetime.fromisoformat(raw["time"]),
        raw["payload"],
    )


class RedisBus:
    """Publishes on Redis; delivers what the channel carries to local subscribers."""

    def __init__(self, redis: Redis, prefix: str, local: MemoryBus) -> None:
        self._redis = redis
        # The reader blocks for as long as the channel is quiet: its connection must not
        # have the fail-fast read timeout of the shared client.
        kwargs = dict(redis.connection_pool.connection_kwargs)
        kwargs.update(socket_timeout=None, health_check_interval=30)
        self._reader = Redis(
            connection_pool=type(redis.connection_pool)(
                connection_class=redis.connection_pool.connection_class, **kwargs
            )
        )
        self.channel = f"{prefix}events"
        self._local = local
        self._connected = asyncio.Event()
        #: Whether a subscription was in place before (and has been lost since).
        self._lost = False

    async def publish(self, event: Event) -> None:
        try:
            await self._redis.publish(self.channel, encode(event))
        except Exception:  # noqa: BLE001 - Redis down: this replica's watchers still hear it
            log.warning("event bus unavailable; delivering locally", extra={"event": event.id})
            self._local.deliver(event)

    def subscribe(self, user_id: str) -> QueueSubscription:
        return self._local.subscribe(user_id)

    async def wait_connected(self) -> None:
        """Until the channel subscription is in place (tests, start-up)."""
        await self._connected.wait()

    async def read(self) -> None:
        """Subscribe to the channel and hand what it carries to local subscribers until
        the connection is lost (then this raises, and the supervisor's loop,
        :func:`server.workers.events.bus_loop`, subscribes again after a back-off)."""
        pubsub = self._reader.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.channel)
            if self._lost:
                # What other replicas published while this one was not subscribed passed
                # it by: its subscribers catch up from the event log.
                self._local.interrupt_all()
            self._lost = True  # until this subscription ends, as they all do
            connection: Any = pubsub.connection  # typed None until subscribed
            if connection is not None:  # redis-py may reconnect and subscribe again itself
                connection.register_connect_callback(self._reconnected)
            self._connected.set()
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    self._deliver(message["data"])
        finally:
            self._connected.clear()
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    def _reconnected(self, _connection: object) -> None:
        log.warning("event bus reconnected; watchers catch up from the event log")
        self._local.interrupt_all()

    async def close(self) -> None:
        """Release the reader's connections."""
        await self._reader.aclose()

    def _deliver(self, data: bytes) -> None:
        try:
            event = decode(data)
        except (ValueError, KeyError, TypeError):
            log.warning("undecodable event on the bus")
            return
        self._local.deliver(event)
