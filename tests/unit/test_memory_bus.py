"""The in-process bus's subscriptions: bounded queues whose reader learns, once, when events
may have passed it by (it fell behind, or the feed between replicas was interrupted), and
then goes on with the events that follow."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from server.domain.events.bus import (
    MemoryBus,
    QueueSubscription,
    SubscriptionInterruptedError,
    SubscriptionOverflowError,
)
from server.domain.events.model import Event

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def event(n: int, user: str = "u1") -> Event:
    return Event(f"evt_{n}", "tunnel.updated", f"users/{user}/tunnels/t", user, "", NOW, {})


async def take(subscription: QueueSubscription, count: int) -> list[str]:
    got: list[str] = []
    async for e in subscription:
        got.append(e.id)
        if len(got) == count:
            break
    return got


async def test_an_interruption_is_raised_once_then_the_feed_goes_on() -> None:
    bus = MemoryBus()
    subscription = bus.subscribe("u1")
    bus.deliver(event(1))
    bus.interrupt_all()  # what was queued is older than what the reader will read
    bus.deliver(event(2))
    with pytest.raises(SubscriptionInterruptedError):
        await take(subscription, 1)
    assert await take(subscription, 1) == ["evt_2"]
    bus.end_all()
    assert await take(subscription, 1) == []  # ended: the iteration stops


async def test_an_overflow_drops_what_is_queued_and_is_raised_once() -> None:
    bus = MemoryBus(buffer=3)
    subscription = bus.subscribe("u1")
    for n in range(10):
        bus.deliver(event(n))
    with pytest.raises(SubscriptionOverflowError):
        await take(subscription, 1)
    bus.deliver(event(10))
    assert await take(subscription, 1) == ["evt_10"]


async def test_ending_a_full_subscription_still_ends_it() -> None:
    bus = MemoryBus(buffer=2)
    subscription = bus.subscribe("u1")
    bus.deliver(event(1))
    bus.deliver(event(2))
    bus.end_all()  # the marker takes the queued events' place: the reader resumes from the log
    assert await take(subscription, 5) == []


async def test_only_the_owners_subscriptions_hear_an_event_and_closing_removes_one() -> None:
    bus = MemoryBus()
    mine, theirs = bus.subscribe("u1"), bus.subscribe("u2")
    bus.deliver(event(1, "u1"))
    assert await take(mine, 1) == ["evt_1"]
    await theirs.close()
    assert bus.subscriber_count == 1
