"""What the dispatcher decides for one delivery: the request to send (payload, optional
transformation, Standard Webhooks signature, the endpoint's headers) and, from the answer,
the delivery's next state and what it means for the endpoint. Pure: no I/O here."""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from server.domain.events import Event
from server.domain.outbox import DeliveryState
from server.domain.webhook_service import Attempt, DisabledReason, Webhook, event_data
from server.domain.webhooks import (
    RETRY_AFTER_STATUSES,
    RETRY_SCHEDULE,
    Outcome,
    Transform,
    apply_transform,
    classify,
    compile_transform,
    headers,
    next_attempt,
    payload,
    retry_after_seconds,
    rfc3339,
)


@dataclass(frozen=True, slots=True)
class Claimed:
    """A delivery this dispatcher holds (until its lease ends)."""

    delivery_id: str
    webhook_id: str
    event_id: str
    attempt_count: int
    test: bool
    token: int


@dataclass(frozen=True, slots=True)
class Finished:
    """A claimed delivery's result, to record if its claim still holds it."""

    delivery_id: str
    token: int
    state: DeliveryState
    next_attempt_time: datetime | None
    attempt: Attempt | None


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request of a delivery."""

    url: str
    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class Settlement:
    """What an attempt's answer means."""

    state: DeliveryState
    next_attempt_time: datetime | None
    #: The endpoint worked (its failure record is cleared).
    endpoint_ok: bool = False
    #: The endpoint failed (its failure record starts, if it has none).
    endpoint_failed: bool = False
    #: Disable the endpoint at once, for this reason.
    disable: DisabledReason | None = None


@functools.lru_cache(maxsize=1024)
def _compiled(expression: str) -> Transform:
    return compile_transform(expression)


def render(webhook: Webhook, event: Event, now: datetime) -> Request:
    """The signed request delivering ``event`` to ``webhook`` at ``now``.

    Raises :class:`~server.domain.webhooks.TransformFailed` or
    :class:`~server.domain.webhooks.PayloadTooLarge`: retrying cannot help either.
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
