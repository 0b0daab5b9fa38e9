"""Webhooks' records: endpoints, their deliveries (the outbox) and attempts, and what the
dispatcher holds and decides. Plain frozen dataclasses and enums.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

# --- the outbox: deliveries to queue ---------------------------------------------------


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


# --- endpoints, their deliveries and attempts ------------------------------------------

DISABLED_EVENT = "endpoint.disabled"


class DisabledReason(enum.StrEnum):
    """Why an endpoint receives nothing (``NONE``: it does)."""

    NONE = ""
    MANUAL = "manual"
    GONE = "gone"
    FAILING = "failing"


@dataclass(frozen=True, slots=True)
class WebhookDraft:
    """The writable part of an endpoint, as a caller sent it."""

    url: str = ""
    description: str = ""
    event_types: tuple[str, ...] = ()
    transform: str = ""
    rate_limit: int = 0
    headers: Mapping[str, str] = field(default_factory=dict)
    disabled: bool = False


@dataclass(frozen=True, slots=True)
class Webhook:
    """A stored endpoint."""

    id: str
    user_id: str
    url: str
    description: str
    event_types: tuple[str, ...]
    transform: str
    rate_limit: int
    headers: Mapping[str, str]
    disabled_reason: DisabledReason
    secret: str
    previous_secret: str | None
    previous_secret_expire_time: datetime | None
    failing_since: datetime | None
    version: int
    create_time: datetime
    update_time: datetime
    request_id: str | None = None

    @property
    def name(self) -> str:
        """``users/{user}/webhooks/{webhook}``."""
        return webhook_name(self.user_id, self.id)

    @property
    def disabled(self) -> bool:
        """Whether nothing is delivered."""
        return self.disabled_reason is not DisabledReason.NONE

    @property
    def etag(self) -> str:
        """Opaque version tag (AIP-154)."""
        digest = hashlib.blake2s(f"{self.id}:{self.version}".encode(), digest_size=8).hexdigest()
        return f'W/"{digest}"'

    def signing_secrets(self, now: datetime) -> list[str]:
        """The secrets a delivery at ``now`` is signed with (two during a rotation)."""
        secrets = [self.secret]
        expires = self.previous_secret_expire_time
        if self.previous_secret and expires is not None and now < expires:
            secrets.append(self.previous_secret)
        return secrets


@dataclass(frozen=True, slots=True)
class Attempt:
    """One HTTP request of a delivery."""

    number: int
    time: datetime
    status_code: int
    latency: float
    response_excerpt: str
    error: str
    succeeded: bool


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event's delivery to one endpoint."""

    id: str
    webhook_id: str
    user_id: str
    event_id: str
    event_type: str
    state: DeliveryState
    attempt_count: int
    next_attempt_time: datetime | None
    test: bool
    create_time: datetime
    update_time: datetime
    attempts: tuple[Attempt, ...] = ()

    @property
    def name(self) -> str:
        """``users/{user}/webhooks/{webhook}/deliveries/{delivery}``."""
        return delivery_name(self.user_id, self.webhook_id, self.id)


# --- replays ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    """What to replay: one event (``users/{user}/events/{event}``), or a time range."""

    event: str = ""
    start: datetime | None = None
    end: datetime | None = None
    event_types: tuple[str, ...] = ()


REPLAY = "webhook.replay"


# --- names -----------------------------------------------------------------------------


def webhook_name(user_id: str, webhook_id: str) -> str:
    """``users/{user}/webhooks/{webhook}``."""
    return f"users/{user_id}/webhooks/{webhook_id}"


def delivery_name(user_id: str, webhook_id: str, delivery_id: str) -> str:
    """``users/{user}/webhooks/{webhook}/deliveries/{delivery}``."""
    return f"{webhook_name(user_id, webhook_id)}/deliveries/{delivery_id}"


# --- what the dispatcher holds and decides ---------------------------------------------


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
