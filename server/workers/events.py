"""The event bus's reader: this replica's subscription to the events every replica
publishes on Redis (:class:`server.storage.bus.RedisBus`)."""

from __future__ import annotations

from server.storage.bus import RedisBus
from server.workers.supervisor import Backoff, Loop

#: Subscribing again after a lost subscription: soon, but never in a tight loop.
RESUBSCRIBE = Backoff(base=0.2, cap=5.0)


def bus_loop(bus: RedisBus) -> Loop:
    """Read the channel; subscribe again when the subscription ends or fails."""
    return Loop("event-bus", bus.read, RESUBSCRIBE.base, backoff=RESUBSCRIBE)
