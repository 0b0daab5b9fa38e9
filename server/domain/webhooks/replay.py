"""Replays: delivering an owner's past events to an endpoint again, as an operation that
any replica's runner carries forward a step at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from server.domain.common.errors import InvalidArgument, NotFound, Violations
from server.domain.common.ids import is_id, new_id
from server.domain.common.names import user_id_of
from server.domain.events.model import TEST_EVENT, Event
from server.domain.operations.model import Operation, Step
from server.domain.unit_of_work import UnitOfWork
from server.domain.webhooks.endpoints import SUBSCRIBABLE
from server.domain.webhooks.model import DeliveryState, NewDelivery, ReplayRequest, Webhook
from server.domain.webhooks.rules import matches, validate_filters

#: How far back a replay or a recovery may reach.
LOOKBACK = timedelta(days=90)

#: Events looked at per replay step (one transaction each).
REPLAY_STEP = 500


def replays(webhook: Webhook, types: tuple[str, ...], event_type: str) -> bool:
    """Whether a replay with the type filter ``types`` (empty: any) delivers events of
    ``event_type`` to ``webhook``: its own filter must take them too."""
    return (
        event_type != TEST_EVENT
        and matches(webhook.event_types, event_type)
        and (not types or matches(types, event_type))
    )


def replay_delivery(webhook: Webhook, event: Event, now: datetime) -> NewDelivery:
    """A replayed event's delivery to ``webhook``, due now."""
    return NewDelivery(
        new_id("dlv", now.timestamp()),
        webhook.id,
        event.id,
        event.type,
        DeliveryState.PENDING,
        now,
    )


def check_replay_types(event_types: Sequence[str]) -> tuple[str, ...]:
    """A replay's own type filter, checked like an endpoint's."""
    return validate_filters(event_types, SUBSCRIBABLE, field="event_types")


def replay_params(owner_id: str, request: ReplayRequest, now: datetime) -> dict[str, Any]:
    """What a replay's operation keeps of ``request``: one event of ``owner_id``'s, or a
    time range within :data:`LOOKBACK` with a type filter; ``InvalidArgument`` if neither."""
    if request.event:
        if request.start or request.end or request.event_types:
            raise InvalidArgument.single(
                "event", "give one event, or a time range (start_time, end_time), not both"
            )
        parts = request.event.split("/")
        if (
            len(parts) != 4
            or parts[2] != "events"
            or user_id_of("/".join(parts[:2]), "event", owner_id) != owner_id
            or not is_id(parts[3], "evt")
        ):
            raise InvalidArgument.single(
                "event",
                "must name an event of the webhook's owner: users/{user}/events/{event}",
            )
        return {"event_id": parts[3], "start": "", "end": "", "event_types": []}
    violations = Violations()
    if request.start is None:
        violations.add("start_time", "is required without event", "REQUIRED")
    elif request.start < now - LOOKBACK:
        violations.add("start_time", f"at most {LOOKBACK.days} days back")
    end = request.end or now
    if request.start is not None and end <= request.start:
        violations.add("end_time", "must be after start_time")
    try:
        types = check_replay_types(request.event_types)
    except InvalidArgument as exc:
        violations.extend(exc.violations)
        types = ()
    violations.raise_if_any()
    assert request.start is not None
    return {
        "event_id": "",
        "start": request.start.isoformat(),
        "end": end.isoformat(),
        "event_types": list(types),
    }


async def replay_events(
    uow: UnitOfWork, webhook: Webhook, operation: Operation, now: datetime
) -> Step:
    """Queue the next events of a replay to ``webhook`` (one step of its operation)."""
    params = operation.params
    if params["event_id"]:
        event = await uow.events.get(params["event_id"])
        if event is None or event.user_id != operation.user_id:
            raise NotFound("event", f"users/{operation.user_id}/events/{params['event_id']}")
        await uow.webhooks.add_deliveries([replay_delivery(webhook, event, now)], now)
        return Step(event.id, 1, finished=True, result={"queued": 1})
    batch = await uow.events.between(
        operation.user_id,
        datetime.fromisoformat(params["start"]),
        datetime.fromisoformat(params["end"]),
        operation.cursor,
        REPLAY_STEP,
    )
    types = tuple(params["event_types"])
    picked = [replay_delivery(webhook, e, now) for e in batch if replays(webhook, types, e.type)]
    if picked:
        await uow.webhooks.add_deliveries(picked, now)
    queued = int((operation.result or {}).get("queued", 0)) + len(picked)
    cursor = batch[-1].id if batch else operation.cursor
    # Progress counts what the total counts: the events that match, not those looked at.
    return Step(cursor, len(picked), finished=len(batch) < REPLAY_STEP, result={"queued": queued})
