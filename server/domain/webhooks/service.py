"""Webhook endpoints and their deliveries: what WebhookService does once authorization
has allowed the call.

An endpoint (``users/{user}/webhooks/{webhook}``) receives the events of its owner's
resources that its filter matches. Deliveries are queued by the event log itself, in the
event's transaction (see :func:`~server.domain.webhooks.outbox.queue_deliveries`); the dispatcher
(:mod:`server.workers.webhooks`) sends them. This module keeps the endpoints valid, rotates
their secrets, answers for the delivery history, and starts test sends, replays and
recoveries.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from server.domain.audit import service as audit
from server.domain.audit.model import AuditTrail
from server.domain.common import fieldmask
from server.domain.common.clock import Clock
from server.domain.common.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PreconditionViolation,
    ResourceExhausted,
)
from server.domain.common.ids import new_id
from server.domain.common.listing import FilterField, Lister, ListSpec, OrderKey, Page
from server.domain.events.model import TEST_EVENT
from server.domain.events.ports import EventBus
from server.domain.events.service import record
from server.domain.operations.model import Operation, Step
from server.domain.unit_of_work import UnitOfWork, UnitOfWorkFactory
from server.domain.webhooks.endpoints import (
    Resolver,
    WebhookPolicy,
    check_draft,
    check_reachable,
    draft_of,
    resolve,
)
from server.domain.webhooks.headers import merge_headers, split_paths
from server.domain.webhooks.model import (
    REPLAY,
    Delivery,
    DeliveryState,
    DisabledReason,
    NewDelivery,
    ReplayRequest,
    Webhook,
    WebhookDraft,
    delivery_name,
    webhook_name,
)
from server.domain.webhooks.ports import Sender
from server.domain.webhooks.replay import (
    LOOKBACK,
    replay_events,
    replay_params,
    replays,
)
from server.domain.webhooks.rules import check_url, new_secret

#: How long the secret before a rotation keeps signing.
ROTATION_OVERLAP = timedelta(hours=24)

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


class WebhookService:
    """Every WebhookService operation after authorization has allowed it."""

    def __init__(
        self,
        uow: UnitOfWorkFactory,
        bus: EventBus,
        lister: Lister,
        clock: Clock,
        policy: WebhookPolicy,
        *,
        sender: Sender | None = None,
        operation_started: Callable[[], None] = lambda: None,
        resolver: Resolver = resolve,
    ) -> None:
        """``sender``: the dispatcher of this process (test sends go through it; None: none
        here); ``operation_started``: tells the operation runner there is work."""
        self._uow = uow
        self._bus = bus
        self._lister = lister
        self._clock = clock
        self.policy = policy
        self._resolver = resolver
        self._sender = sender
        self._operation_started = operation_started

    # -- endpoints ------------------------------------------------------------------------

    async def get(self, owner_id: str, webhook_id: str) -> Webhook:
        """An endpoint of ``owner_id``."""
        async with self._uow(lag_tolerant=True) as uow:
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
        async with self._uow(lag_tolerant=True) as uow:
            rows = await uow.webhooks.list(owner_id, query)
        return self._lister.page(query, rows)

    async def create(
        self,
        owner_id: str,
        draft: WebhookDraft,
        *,
        request_id: str,
        trail: AuditTrail | None = None,
    ) -> Webhook:
        """A new endpoint with a fresh secret (returned with it, this once)."""
        if len(request_id) > 64:
            raise InvalidArgument.single("request_id", "at most 64 characters")
        clean = check_draft(draft, self.policy)
        if self.policy.public_only:
            await check_reachable(clean.url, self._resolver)
        now = self._clock.now()
        async with self._uow() as uow:
            if request_id and (done := await uow.webhooks.find_by_request(owner_id, request_id)):
                await audit.record(uow, trail, now)
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
            await audit.record(uow, trail, now, subject_user_id=owner_id, resource=webhook.name)
        return webhook

    async def update(
        self,
        owner_id: str,
        webhook_id: str,
        requested: WebhookDraft,
        paths: tuple[str, ...],
        *,
        etag: str,
        trail: AuditTrail | None = None,
    ) -> Webhook:
        """Apply the masked paths of ``requested``; validated as a whole. Re-enabling clears
        the failure record. ``headers.<name>`` paths change single headers (see
        :mod:`server.domain.webhooks.headers`)."""
        paths, header_names = split_paths(paths)
        paths = fieldmask.check_paths(paths, UPDATABLE_PATHS)
        if "url" in paths and self.policy.public_only:
            check_url(requested.url, require_https=self.policy.require_https)
            await check_reachable(requested.url, self._resolver)
        async with self._uow() as uow:
            webhook = await _load(uow, owner_id, webhook_id, lock=True)
            _check_etag(webhook, etag, "webhook.etag")
            merged = fieldmask.merge(draft_of(webhook), requested, paths)
            if header_names:
                headers = merge_headers(webhook.headers, requested.headers, header_names)
                merged = replace(merged, headers=headers)
            clean = check_draft(merged, self.policy)
            now = self._clock.now()
            if clean == draft_of(webhook):
                await audit.record(uow, trail, now)
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
                update_time=now,
            )
            await uow.webhooks.save(changed, webhook.version)
            if changed.disabled and not webhook.disabled:
                await uow.webhooks.fail_pending(webhook.id, changed.update_time)
            masked = [*paths, *(f"headers.{name}" for name in header_names)]
            await audit.record(
                uow, trail, now, subject_user_id=owner_id, resource=webhook.name, paths=masked
            )
        return changed

    async def delete(
        self, owner_id: str, webhook_id: str, *, etag: str, trail: AuditTrail | None = None
    ) -> Webhook:
        """Delete an endpoint with its history."""
        async with self._uow() as uow:
            webhook = await _load(uow, owner_id, webhook_id, lock=True)
            _check_etag(webhook, etag, "etag")
            await uow.webhooks.delete(webhook.id)
            await audit.record(
                uow, trail, self._clock.now(), subject_user_id=owner_id, resource=webhook.name
            )
        return replace(webhook, secret="", previous_secret=None)

    async def rotate_secret(
        self, owner_id: str, webhook_id: str, trail: AuditTrail | None = None
    ) -> Webhook:
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
            await audit.record(uow, trail, now, subject_user_id=owner_id, resource=webhook.name)
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
        async with self._uow(lag_tolerant=True) as uow:
            await _load(uow, owner_id, webhook_id)
            rows = await uow.webhooks.deliveries(webhook_id, query)
        return self._lister.page(query, rows, lambda d: (d.create_time, d.id))

    async def delivery(self, owner_id: str, webhook_id: str, delivery_id: str) -> Delivery:
        """One delivery with every attempt."""
        async with self._uow(lag_tolerant=True) as uow:
            await _load(uow, owner_id, webhook_id)
            found = await uow.webhooks.delivery(delivery_id)
        if found is None or found.webhook_id != webhook_id:
            raise NotFound("webhook delivery", delivery_name(owner_id, webhook_id, delivery_id))
        return found

    async def test(
        self,
        owner_id: str,
        webhook_id: str,
        data: Mapping[str, Any],
        *,
        actor: str,
        trail: AuditTrail | None = None,
    ) -> Delivery:
        """Send a ``webhook.test`` event to the endpoint now; the delivery with its attempt."""
        if self._sender is None:
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
            await audit.record(uow, trail, now, subject_user_id=owner_id, resource=webhook.name)
        await self._sender.deliver_now(delivery_id)
        return await self.delivery(owner_id, webhook_id, delivery_id)

    async def replay(
        self,
        owner_id: str,
        webhook_id: str,
        request: ReplayRequest,
        *,
        request_id: str,
        trail: AuditTrail | None = None,
    ) -> Operation:
        """Start delivering past events to the endpoint again; the operation (a runner on
        any replica carries it out, see :meth:`replay_step`)."""
        if len(request_id) > 64:
            raise InvalidArgument.single("request_id", "at most 64 characters")
        now = self._clock.now()
        params = replay_params(owner_id, request, now)
        async with self._uow() as uow:
            if request_id and (done := await uow.operations.find_by_request(owner_id, request_id)):
                await audit.record(uow, trail, now)
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
                total = sum(n for t, n in counts.items() if replays(webhook, wanted, t))
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
            await audit.record(
                uow,
                trail,
                now,
                subject_user_id=owner_id,
                resource=webhook.name,
                operation=operation.name,
            )
            uow.after_commit(self._started)
        return operation

    async def _started(self) -> None:
        self._operation_started()

    async def replay_step(self, uow: UnitOfWork, operation: Operation) -> Step:
        """Queue the next events of a replay; run by the operation runner in ``uow``."""
        webhook = await _load(uow, operation.user_id, operation.params["webhook_id"])
        return await replay_events(uow, webhook, operation, self._clock.now())

    async def recover(
        self, owner_id: str, webhook_id: str, since: datetime, trail: AuditTrail | None = None
    ) -> int:
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
            await audit.record(
                uow, trail, now, subject_user_id=owner_id, resource=webhook.name, recovered=count
            )
        return count


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
