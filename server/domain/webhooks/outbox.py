"""The webhook outbox: an event's deliveries are queued in the event's own transaction, so
an event exists with its deliveries or not at all (a crash between cannot lose one).

:func:`server.domain.events.service.record` calls :func:`queue_deliveries` (webhooks
publish this module to the event log); a new event type needs nothing here, only a place
in ``EVENT_TYPES``.
"""

from __future__ import annotations

from server.domain.common.ids import new_id
from server.domain.events.model import TEST_EVENT, Event
from server.domain.unit_of_work import UnitOfWork
from server.domain.webhooks.model import DeliveryState, NewDelivery
from server.domain.webhooks.rules import matches


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
