"""What the dispatcher decides for one delivery: the request to send (payload, optional
transformation, Standard Webhooks signature, the endpoint's headers) and, from the answer,
the delivery's next state and what it means for the endpoint. Pure: no I/O here.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from server.domain.events.model import TEST_EVENT, Event
from server.domain.webhooks.model import DeliveryState, DisabledReason, Request, Settlement, Webhook
from server.domain.webhooks.rules import (
    RETRY_AFTER_STATUSES,
    RETRY_SCHEDULE,
    Outcome,
    Transform,
    apply_transform,
    classify,
    compile_transform,
    headers,
    json_names,
    next_attempt,
    payload,
    retry_after_seconds,
    rfc3339,
)


def event_data(event: Event) -> dict[str, Any]:
    """The ``data`` of an event's webhook payload: its subject, its actor, and the object
    the event describes, with the JSON API's field names (``displayName``, not
    ``display_name``). A test event's object is the caller's own JSON, as it was sent."""
    described = event.payload if event.type == TEST_EVENT else json_names(event.payload)
    return {"subject": event.subject, "actor": event.actor, "object": described}


@functools.lru_cache(maxsize=1024)
def _compiled(expression: str) -> Transform:
    return compile_transform(expression)


def render(webhook: Webhook, event: Event, now: datetime) -> Request:
    """The signed request delivering ``event`` to ``webhook`` at ``now``.

    Raises :class:`~server.domain.webhooks.rules.TransformFailed` or
    :class:`~server.domain.webhooks.rules.PayloadTooLarge`: retrying cannot help either.
    """
    data = event_data(event)
    if webhook.transform:
        document = {"type": event.type, "timestamp": rfc3339(event.time), "data": data}
        data = apply_transform(_compiled(webhook.transform), document)
    body = payload(event.type, event.time, data)
    signed = headers(webhook.signing_secrets(now), event.id, int(now.timestamp()), body)
    return Request(webhook.url, body, {**webhook.headers, **signed})


def settle(
    number: int,
    status: int | None,
    error: str,
    retry_after: str | None,
    now: datetime,
    *,
    test: bool,
    rng: random.Random,
    schedule: Sequence[timedelta] = RETRY_SCHEDULE,
) -> Settlement:
    """The outcome of attempt ``number`` (1 for the first) that got ``status`` (or
    ``error``): success, a retry on the schedule (never before ``Retry-After`` on 429 and
    503), or failure for good (retries exhausted, or 410 Gone, which disables the endpoint).
    A test send is never retried and says nothing about the endpoint."""
    outcome = classify(status, error or None)
    if outcome is Outcome.SUCCESS:
        return Settlement(DeliveryState.SUCCEEDED, None, endpoint_ok=not test)
    if test:
        return Settlement(DeliveryState.FAILED, None)
    if outcome is Outcome.GONE:
        return Settlement(DeliveryState.FAILED, None, disable=DisabledReason.GONE)
    wait = retry_after_seconds(retry_after, now) if status in RETRY_AFTER_STATUSES else None
    due = next_attempt(number, now, rng=rng, retry_after=wait, schedule=schedule)
    if due is None:
        return Settlement(DeliveryState.FAILED, None, endpoint_failed=True)
    return Settlement(DeliveryState.PENDING, due, endpoint_failed=True)
