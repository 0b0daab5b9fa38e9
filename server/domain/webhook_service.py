"""Webhook endpoints and their deliveries: what WebhookService does once authorization
has allowed the call.

An endpoint (``users/{user}/webhooks/{webhook}``) receives the events of its owner's
resources that its filter matches. Deliveries are queued by the event log itself, in the
event's transaction (see :func:`queue_deliveries`); the dispatcher
(:mod:`server.workers.webhooks`) sends them. This module keeps the endpoints valid, rotates
their secrets, answers for the delivery history, and starts test sends, replays and
recoveries.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Protocol
from urllib.parse import urlsplit

from server.domain import audit, fieldmask, validation
from server.domain.addresses import public_only
from server.domain.clock import Clock
from server.domain.events import EVENT_TYPES, Event, EventBus, record
from server.domain.ids import is_id, new_id
from server.domain.listing import FilterField, Lister, ListSpec, OrderKey, Page
from server.domain.names import user_id_of
from server.domain.operations import Operation, Step
from server.domain.outbox import TEST_EVENT, DeliveryState, NewDelivery
from server.domain.ports import UnitOfWork, UnitOfWorkFactory
from server.domain.webhook_headers import check_headers, merge_headers, split_paths
from server.domain.webhooks import (
    check_url,
    compile_transform,
    json_names,
    matches,
    new_secret,
    validate_filters,
)
from server.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PreconditionViolation,
    ResourceExhausted,
    Violations,
)

#: How long the secret before a rotation keeps signing.
ROTATION_OVERLAP = timedelta(hours=24)
MAX_RATE_LIMIT = 1000
MAX_DESCRIPTION = 1000
#: Longest wait for a URL's host to resolve when it is written.
RESOLVE_TIMEOUT = 5.0
#: How far back a replay or a recovery may reach.
LOOKBACK = timedelta(days=90)
DISABLED_EVENT = "endpoint.disabled"
#: Types an endpoint may subscribe to (a test event goes only to the endpoint tested).
SUBSCRIBABLE = EVENT_TYPES - {TEST_EVENT}

UPDATABLE_PATHS = frozenset(
    {"url", "description", "event_types", "transform", "rate_limit", "headers", "disabled"}
)

WEBHOOK_LIST_SPEC = ListSpec(
    filter_fields={
        "url": FilterField("string"),
        "disabled_reason": FilterField("enum", frozenset({"", "manual", "gone", "failing"})),
        "create_time": FilterField("timestamp"),
    },
    order_fields=frozenset({"url", "create_time"}),
    default_order=(OrderKey("create_time"),),
)

DELIVERY_LIST_SPEC = ListSpec(
    filter_fields={
        "state": FilterField("enum", frozenset({"pending", "succeeded", "failed"})),
        "event_type": FilterField("string"),
        "create_time": FilterField("timestamp"),
    },
    order_fields=frozenset({"create_time"}),
    default_order=(OrderKey("create_time", descending=True),),
)


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


@dataclass(frozen=True, slots=True)
class WebhookPolicy:
    """Deployment rules for endpoints."""

    #: Production: only https URLs.
    require_https: bool = False
    #: Endpoints per user.
    max_webhooks: int = 20
    #: Production: a URL's host must resolve to global addresses only (checked when it is
    #: written, and again by the sender on every connection).
    public_only: bool = False


#: Resolves a host name to its addresses (the event loop's getaddrinfo by default).
Resolver = Callable[[str], Awaitable[list[str]]]


async def resolve(host: str) -> list[str]:
    """The addresses ``host`` resolves to (IPv6 scope ids dropped)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return [str(info[4][0]).split("%", 1)[0] for info in infos]


async def check_reachable(url: str, resolver: Resolver, field_name: str = "webhook.url") -> None:
    """:class:`InvalidArgument` unless every address ``url``'s host resolves to is global
    (no loopback, private, link-local or otherwise special address: SSRF)."""
    host = (urlsplit(url).hostname or "").strip("[]")
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT):
            addresses = await resolver(host)
    except (OSError, TimeoutError, UnicodeError):
        raise InvalidArgument.single(field_name, "the host does not resolve") from None
    if not addresses or not all(public_only(a) for a in addresses):
        raise InvalidArgument.single(
            field_name, "the host resolves to a loopback, private or link-local address"
        )


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    """What to replay: one event (``users/{user}/events/{event}``), or a time range."""

    event: str = ""
    start: datetime | None = None
    end: datetime | None = None
    event_types: tuple[str, ...] = ()


REPLAY = "webhook.replay"
#: Events looked at per replay step (one transaction each).
REPLAY_STEP = 500


class Sender(Protocol):
    """Makes one attempt of a delivery now (the dispatcher); used by test sends."""

    async def deliver_now(self, delivery_id: str) -> None:
        """Attempt ``delivery_id`` at once and record the attempt."""
        ...


def webhook_name(user_id: str, webhook_id: str) -> str:
    """``users/{user}/webhooks/{webhook}``."""
    return f"users/{user_id}/webhooks/{webhook_id}"


def delivery_name(user_id: str, webhook_id: str, delivery_id: str) -> str:
    """``users/{user}/webhooks/{webhook}/deliveries/{delivery}``."""
    return f"{webhook_name(user_id, webhook_id)}/deliveries/{delivery_id}"


def webhook_parts(name: str, field_name: str, caller_id: str | None) -> tuple[str, str]:
    """(owner id, webhook id) of ``users/{user}/webhooks/{webhook}``."""
    parts = name.split("/")
    if len(parts) != 4 or parts[2] != "webhooks":
        raise InvalidArgument.single(field_name, "must look like users/{user}/webhooks/{webhook}")
    owner = user_id_of("/".join(parts[:2]), field_name, caller_id)
    if not is_id(parts[3], "whk"):
        raise InvalidArgument.single(field_name, "is not a valid webhook id")
    return owner, parts[3]


def delivery_parts(name: str, field_name: str, caller_id: str | None) -> tuple[str, str, str]:
    """(owner id, webhook id, delivery id) of a delivery's name."""
    parts = name.split("/")
    if len(parts) != 6 or parts[4] != "deliveries":
        raise InvalidArgument.single(
            field_name, "must look like users/{user}/webhooks/{webhook}/deliveries/{delivery}"
        )
    owner, webhook_id = webhook_parts("/".join(parts[:4]), field_name, caller_id)
    if not is_id(parts[5], "dlv"):
        raise InvalidArgument.single(field_name, "is not a valid delivery id")
    return owner, webhook_id, parts[5]


def event_data(event: Event) -> dict[str, Any]:
    """The ``data`` of an event's webhook payload: its subject, its actor, and the object
    the event describes, with the JSON API's field names (``displayName``, not
    ``display_name``). A test event's object is the caller's own JSON, as it was sent."""
    described = event.payload if event.type == TEST_EVENT else json_names(event.payload)
    return {"subject": event.subject, "actor": event.actor, "object": described}


def check_draft(draft: WebhookDraft, policy: WebhookPolicy) -> WebhookDraft:
    """The draft cleaned, or :class:`InvalidArgument` naming every bad field."""
    violations = Violations()

    def checked(fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InvalidArgument as exc:
            violations.extend(exc.violations)
            return None

    if not draft.url:
        violations.add("webhook.url", "is required", "REQUIRED")
    else:
        checked(check_url, draft.url, require_https=policy.require_https)
    description = validation.free_text(
        draft.description, "webhook.description", violations, MAX_DESCRIPTION
    )
    event_types = checked(validate_filters, draft.event_types, SUBSCRIBABLE) or ()
    if draft.transform:
        checked(compile_transform, draft.transform)
    if not 0 <= draft.rate_limit <= MAX_RATE_LIMIT:
        violations.add("webhook.rate_limit", f"between 0 (no limit) and {MAX_RATE_LIMIT}")
    headers = check_headers(draft.headers, violations)
    violations.raise_if_any()
    return replace(draft, description=description, event_types=event_types, headers=headers)


class WebhookService:
    """Every WebhookService operation after authorization has allowed it."""

    def __init__(
        self,
        uow: UnitOfWorkFactory,
        bus: EventBus,
        lister: Lister,
        clock: Clock,
        policy: WebhookPolicy,
    ) -> None:
        self._uow = uow
        self._bus = bus
        self._lister = lister
        self._clock = clock
        self.policy = policy
        self.resolver: Resolver = resolve
        #: The dispatcher of this process (test sends go through it).
        self.sender: Sender | None = None
        #: Called when an operation was started (the runner looks for work).
        self.operation_started: Callable[[], None] = lambda: None

    # -- endpoints ------------------------------------------------------------------------

    async def get(self, owner_id: str, webhook_id: str) -> Webhook:
        """An endpoint of ``owner_id``."""
        async with self._uow(readonly=True) as uow:
            return await _load(uow, owner_id, webhook_id)

    async def list(
        self,
        owner_id: str,
        *,
        page_size: int,
        page_token: str,
        filter: str,  # noqa: A002 - the AIP field is called filter
        order_by: str,
    ) -> Page[Webhook]:
        """A page of the owner's endpoints."""
        query = self._lister.query(
            WEBHOOK_LIST_SPEC,
            page_size=page_size,
            page_token=page_token,
            filter=filter,
            order_by=order_by,
            scope=f"owner={owner_id}",
        )
        async with self._uow(readonly=True) as uow:
            rows = await uow.webhooks.list(owner_id, query)
        return self._lister.page(query, rows)

    async def create(self, owner_id: str, draft: WebhookDraft, *, request_id: str) -> Webhook:
        """A new endpoint with a fresh secret (returned with it, this once)."""
        if len(request_id) > 64:
            raise InvalidArgument.single("request_id", "at most 64 characters")
        clean = check_draft(draft, self.policy)
        if self.policy.public_only:
            await check_reachable(clean.url, self.resolver)
        now = self._clock.now()
        async with self._uow() as uow:
            if request_id and (done := await uow.webhooks.find_by_request(owner_id, request_id)):
                return done
            await uow.webhooks.lock_owner(owner_id)
            if await uow.webhooks.count(owner_id) >= self.policy.max_webhooks:
                raise ResourceExhausted(
                    f"at most {self.policy.max_webhooks} webhook endpoints per user",
                    reason="WEBHOOK_LIMIT",
                )
            webhook = Webhook(
                id=new_id("whk", now.timestamp()),
                user_id=owner_id,
                url=clean.url,
                description=clean.description,
                event_types=clean.event_types,
                transform=clean.transform,
                rate_limit=clean.rate_limit,
                headers=dict(clean.headers),
                disabled_reason=DisabledReason.MANUAL if clean.disabled else DisabledReason.NONE,
                secret=new_secret(),
                previous_secret=None,
                previous_secret_expire_time=None,
                failing_since=None,
                version=1,
                create_time=now,
                update_time=now,
                request_id=request_id or None,
            )
            await uow.webhooks.add(webhook)
            audit.annotate(subject_user_id=owner_id, resource=webhook.name)
        return webhook

    async def update(
        self,
        owner_id: str,
        webhook_id: str,
        requested: WebhookDraft,
        paths: tuple[str, ...],
        *,
        etag: str,
    ) -> Webhook:
        """Apply the masked paths of ``requested``; validated as a whole. Re-enabling clears
        the failure record. ``headers.<name>`` paths change single headers (see
        :mod:`server.domain.webhook_headers`)."""
        paths, header_names = split_paths(paths)
        paths = fieldmask.check_paths(paths, UPDATABLE_PATHS)
        if "url" in paths and self.policy.public_only:
            check_url(requested.url, require_https=self.policy.require_https)
            await check_reachable(requested.url, self.resolver)
        async with self._uow() as uow:
            webhook = await _load(uow, owner_id, webhook_id, lock=True)
            _check_etag(webhook, etag, "webhook.etag")
            merged = fieldmask.merge(draft_of(webhook), requested, paths)
            if header_names:
                headers = merge_headers(webhook.headers, requested.headers, header_names)
                merged = replace(merged, headers=headers)
            clean = check_draft(merged, self.policy)
            if clean == draft_of(webhook):
                return webhook
            reason = webhook.disabled_reason
            if clean.disabled and not webhook.disabled:
                reason = DisabledReason.MANUAL
            elif not clean.disabled:
                reason = DisabledReason.NONE
            changed = replace(
                webhook,
                url=clean.url,
                description=clean.description,
                event_types=clean.event_types,
                transform=clean.transform,
                rate_limit=clean.rate_limit,
                headers=dict(clean.headers),
                disabled_reason=reason,
                failing_since=None if not clean.disabled else webhook.failing_since,
                version=webhook.version + 1,
                update_time=self._clock.now(),
            )
            await uow.webhooks.save(changed, webhook.version)
            if changed.disabled and not webhook.disabled:
                await uow.webhooks.fail_pending(webhook.id, changed.update_time)
            masked = [*paths, *(f"headers.{name}" for name in header_names)]
            audit.annotate(subject_user_id=owner_id, resource=webhook.name, paths=masked)
        return changed

    async def delete(self, owner_id: str, webhook_id: str, *, etag: str) -> Webhook:
        """Delete an endpoint with its history."""
        async with self._uow() as uow:
            webhook = await _load(uow, owner_id, webhook_id, lock=True)
            _check_etag(webhook, etag, "etag")
            await uow.webhooks.delete(webhook.id)
            audit.annotate(subject_user_id=owner_id, resource=webhook.name)
        return replace(webhook, secret="", previous_secret=None)

    async def rotate_secret(self, owner_id: str, webhook_id: str) -> Webhook:
        """A new secret; the current one keeps signing for :data:`ROTATION_OVERLAP`."""
        now = self._clock.now()
        async with self._uow() as uow:
            webhook = await _load(uow, owner_id, webhook_id, lock=True)
            changed = replace(
                webhook,
                secret=new_secret(),
                previous_secret=webhook.secret,
                previous_secret_expire_time=now + ROTATION_OVERLAP,
                version=webhook.version + 1,
                update_time=now,
            )
            await uow.webhooks.save(changed, webhook.version)
            audit.annotate(subject_user_id=owner_id, resource=webhook.name)
        return changed

    # -- deliveries -----------------------------------------------------------------------

    async def deliveries(
        self,
        owner_id: str,
        webhook_id: str,
        *,
        page_size: int,
        page_token: str,
        filter: str,  # noqa: A002 - the AIP field is called filter
    ) -> Page[Delivery]:
        """A page of an endpoint's deliveries, newest first, with their attempts."""
        query = self._lister.query(
            DELIVERY_LIST_SPEC,
            page_size=page_size,
            page_token=page_token,
            filter=filter,
            order_by="",
            scope=f"webhook={webhook_id}",
        )
        async with self._uow(readonly=True) as uow:
            await _load(uow, owner_id, webhook_id)
            rows = await uow.webhooks.deliveries(webhook_id, query)
        return self._lister.page(query, rows, lambda d: (d.create_time, d.id))

    async def delivery(self, owner_id: str, webhook_id: str, delivery_id: str) -> Delivery:
        """One delivery with every attempt."""
        async with self._uow(readonly=True) as uow:
            await _load(uow, owner_id, webhook_id)
            found = await uow.webhooks.delivery(delivery_id)
        if found is None or found.webhook_id != webhook_id:
            raise NotFound("webhook delivery", delivery_name(owner_id, webhook_id, delivery_id))
        return found

    async def test(
        self, owner_id: str, webhook_id: str, data: Mapping[str, Any], *, actor: str
    ) -> Delivery:
        """Send a ``webhook.test`` event to the endpoint now; the delivery with its attempt."""
        if self.sender is None:
            raise FailedPrecondition("webhook delivery is not running on this server")
        now = self._clock.now()
        async with self._uow() as uow:
            webhook = await _load(uow, owner_id, webhook_id)
            event = await record(
                uow,
                self._bus,
                self._clock,
                TEST_EVENT,
                subject=webhook.name,
                user_id=owner_id,
                actor=actor,
                payload=dict(data) or {"message": "test"},
            )
            delivery_id = new_id("dlv", now.timestamp())
            await uow.webhooks.add_deliveries(
                [
                    NewDelivery(
                        delivery_id,
                        webhook.id,
                        event.id,
                        event.type,
                        DeliveryState.PENDING,
                        None,  # not due: this call makes the attempt itself
                        test=True,
                    )
                ],
                now,
            )
            audit.annotate(subject_user_id=owner_id, resource=webhook.name)
        await self.sender.deliver_now(delivery_id)
        return await self.delivery(owner_id, webhook_id, delivery_id)

    async def replay(
        self, owner_id: str, webhook_id: str, request: ReplayRequest, *, request_id: str
    ) -> Operation:
        """Start delivering past events to the endpoint again; the operation (a runner on
        any replica carries it out, see :meth:`replay_step`)."""
        if len(request_id) > 64:
            raise InvalidArgument.single("request_id", "at most 64 characters")
        now = self._clock.now()
        params = self._replay_params(owner_id, request, now)
        async with self._uow() as uow:
            if request_id and (done := await uow.operations.find_by_request(owner_id, request_id)):
                return done
            webhook = await _load(uow, owner_id, webhook_id)
            _assert_enabled(webhook)
            if params["event_id"]:
                if await uow.events.get(params["event_id"]) is None:
                    raise NotFound("event", request.event)
                total = 1
            else:
                counts = await uow.events.count_by_type(
                    owner_id,
                    datetime.fromisoformat(params["start"]),
                    datetime.fromisoformat(params["end"]),
                )
                wanted = tuple(params["event_types"])
                total = sum(n for t, n in counts.items() if _replays(webhook, wanted, t))
            operation = Operation(
                id=new_id("opr", now.timestamp()),
                user_id=owner_id,
                kind=REPLAY,
                target=webhook.name,
                params=params | {"webhook_id": webhook.id},
                create_time=now,
                update_time=now,
                total=total,
                request_id=request_id or None,
            )
            await uow.operations.add(operation)
            audit.annotate(
                subject_user_id=owner_id, resource=webhook.name, operation=operation.name
            )
            uow.after_commit(self._started)
        return operation

    async def _started(self) -> None:
        self.operation_started()

    def _replay_params(
        self, owner_id: str, request: ReplayRequest, now: datetime
    ) -> dict[str, Any]:
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

    async def replay_step(self, uow: UnitOfWork, operation: Operation) -> Step:
        """Queue the next events of a replay; run by the operation runner in ``uow``."""
        params = operation.params
        webhook = await _load(uow, operation.user_id, params["webhook_id"])
        now = self._clock.now()
        if params["event_id"]:
            event = await uow.events.get(params["event_id"])
            if event is None or event.user_id != operation.user_id:
                raise NotFound("event", f"users/{operation.user_id}/events/{params['event_id']}")
            await uow.webhooks.add_deliveries([_replayed(webhook, event, now)], now)
            return Step(event.id, 1, finished=True, result={"queued": 1})
        batch = await uow.events.between(
            operation.user_id,
            datetime.fromisoformat(params["start"]),
            datetime.fromisoformat(params["end"]),
            operation.cursor,
            REPLAY_STEP,
        )
        types = tuple(params["event_types"])
        picked = [_replayed(webhook, e, now) for e in batch if _replays(webhook, types, e.type)]
        if picked:
            await uow.webhooks.add_deliveries(picked, now)
        queued = int((operation.result or {}).get("queued", 0)) + len(picked)
        cursor = batch[-1].id if batch else operation.cursor
        # Progress counts what the total counts: the events that match, not those looked at.
        return Step(
            cursor, len(picked), finished=len(batch) < REPLAY_STEP, result={"queued": queued}
        )

    async def recover(self, owner_id: str, webhook_id: str, since: datetime) -> int:
        """Queue again, due now, the endpoint's failed deliveries queued since ``since``."""
        now = self._clock.now()
        if since < now - LOOKBACK or since > now:
            raise InvalidArgument.single(
                "start_time", f"within the last {LOOKBACK.days} days, not in the future"
            )
        async with self._uow() as uow:
            webhook = await _load(uow, owner_id, webhook_id)
            _assert_enabled(webhook)
            count = await uow.webhooks.recover(webhook_id, since, now)
            audit.annotate(subject_user_id=owner_id, resource=webhook.name, recovered=count)
        return count


def _replays(webhook: Webhook, types: tuple[str, ...], event_type: str) -> bool:
    """Whether a replay with the type filter ``types`` (empty: any) delivers events of
    ``event_type`` to ``webhook``: its own filter must take them too."""
    return (
        event_type != TEST_EVENT
        and matches(webhook.event_types, event_type)
        and (not types or matches(types, event_type))
    )


def _replayed(webhook: Webhook, event: Event, now: datetime) -> NewDelivery:
    return NewDelivery(
        new_id("dlv", now.timestamp()),
        webhook.id,
        event.id,
        event.type,
        DeliveryState.PENDING,
        now,
    )


def draft_of(webhook: Webhook) -> WebhookDraft:
    """The writable part of a stored endpoint."""
    return WebhookDraft(
        webhook.url,
        webhook.description,
        webhook.event_types,
        webhook.transform,
        webhook.rate_limit,
        dict(webhook.headers),
        webhook.disabled,
    )


def check_replay_types(event_types: Sequence[str]) -> tuple[str, ...]:
    """A replay's own type filter, checked like an endpoint's."""
    return validate_filters(event_types, SUBSCRIBABLE, field="event_types")


def _disabled(webhook: Webhook) -> FailedPrecondition:
    return FailedPrecondition(
        "the webhook is disabled; enable it first",
        [PreconditionViolation("STATE", "webhook", "the webhook is disabled")],
        reason="WEBHOOK_DISABLED",
        metadata={"disabled_reason": webhook.disabled_reason.value},
    )


async def _load(uow: UnitOfWork, owner_id: str, webhook_id: str, *, lock: bool = False) -> Webhook:
    webhook = await uow.webhooks.get(webhook_id, lock=lock)
    if webhook is None or webhook.user_id != owner_id:
        raise NotFound("webhook", webhook_name(owner_id, webhook_id))
    return webhook


def _check_etag(webhook: Webhook, etag: str, field_name: str) -> None:
    if etag and etag != webhook.etag:
        raise Aborted(
            "the webhook changed since it was read; read it again",
            reason="ETAG_MISMATCH",
            metadata={"field": field_name},
        )


def _assert_enabled(webhook: Webhook) -> None:
    """:class:`FailedPrecondition` while the endpoint is disabled."""
    if webhook.disabled:
        raise _disabled(webhook)
