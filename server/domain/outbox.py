"""The webhook outbox: an event's deliveries are queued in the event's own transaction, so
an event exists with its deliveries or not at all (a crash between cannot lose one).

:func:`server.domain.events.record` calls :func:`queue_deliveries`; a new event type needs
nothing here, only a place in ``EVENT_TYPES``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from server.domain.ids import new_id
from server.domain.webhooks import matches

if TYPE_CHECKING:
    from server.domain.events import Event
    from server.domain.ports import UnitOfWork

#: Sent by TestWebhook to the endpoint tested, and to no other.
TEST_EVENT = "webhook.test"


class DeliveryState(enum.StrEnum):
    """Where a delivery stands."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Receiver:
    """What the outbox needs to know of an endpoint."""

    id: str
    event_types: tuple[str, ...]
    disabled: bool


@dataclass(frozen=True, slots=True)
class NewDelivery:
    """A delivery to queue."""

    id: str
    webhook_id: str
    event_id: str
    event_type: str
    state: DeliveryState
    next_attempt_time: datetime | None
    test: bool = False


async def queue_deliveries(uow: UnitOfWork, event: Event) -> int:
    """Queue ``event`` for every endpoint of its owner whose filter matches, in ``uow``. A
    disabled endpoint gets the delivery as failed, for RecoverWebhookDeliveries to queue
    again. The number queued."""
    if event.type == TEST_EVENT:
        return 0
    queued = [
        NewDelivery(
            new_id("dlv", event.time.timestamp()),
            receiver.id,
            event.id,
            event.type,
            DeliveryState.FAILED if receiver.disabled else DeliveryState.PENDING,
            None if receiver.disabled else event.time,
        )
        for receiver in await uow.webhooks.receivers(event.user_id)
        if matches(receiver.event_types, event.type)
    ]
    if queued:
        await uow.webhooks.add_deliveries(queued, event.time)
    return len(queued)
