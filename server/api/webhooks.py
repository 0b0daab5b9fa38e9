"""WebhookService and OperationService."""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf import json_format
from google.rpc import status_pb2
from tunnelplane.v1 import operations_pb2, webhooks_pb2

from server.api import convert
from server.api.convert import timestamp
from server.api.tunnel_convert import duration
from server.api.users import caller_id
from server.domain.clock import Clock
from server.domain.names import user_id_of
from server.domain.operations import Operation, OperationService, operation_parts
from server.domain.outbox import DeliveryState
from server.domain.webhook_service import (
    UPDATABLE_PATHS,
    Delivery,
    DisabledReason,
    ReplayRequest,
    Webhook,
    WebhookDraft,
    WebhookService,
    delivery_parts,
    webhook_parts,
)
from server.errors import InvalidArgument
from server.pipeline import Call

P = webhooks_pb2
O = operations_pb2  # noqa: E741 - the module's short name, like P
MAX_TEST_DATA = 16 * 1024

REASONS: Mapping[DisabledReason, int] = {
    DisabledReason.NONE: P.Webhook.DISABLED_REASON_UNSPECIFIED,
    DisabledReason.MANUAL: P.Webhook.DISABLED_REASON_MANUAL,
    DisabledReason.GONE: P.Webhook.DISABLED_REASON_GONE,
    DisabledReason.FAILING: P.Webhook.DISABLED_REASON_FAILING,
}
STATES: Mapping[DeliveryState, int] = {
    DeliveryState.PENDING: P.WebhookDelivery.STATE_PENDING,
    DeliveryState.SUCCEEDED: P.WebhookDelivery.STATE_SUCCEEDED,
    DeliveryState.FAILED: P.WebhookDelivery.STATE_FAILED,
}


def webhook(w: Webhook, *, with_secret: bool = False) -> P.Webhook:
    """The API form of an endpoint; the secret only when just made, header values never
    (they are write-only: ``header_names`` lists the names)."""
    return P.Webhook(
        name=w.name,
        url=w.url,
        description=w.description,
        event_types=list(w.event_types),
        transform=w.transform,
        rate_limit=w.rate_limit,
        header_names=sorted(w.headers),
        disabled=w.disabled,
        disabled_reason=REASONS[w.disabled_reason],  # type: ignore[arg-type]
        secret=w.secret if with_secret else "",
        previous_secret_expire_time=timestamp(w.previous_secret_expire_time),
        failing_since=timestamp(w.failing_since),
        create_time=timestamp(w.create_time),
        update_time=timestamp(w.update_time),
        etag=w.etag,
    )


def draft(message: P.Webhook) -> WebhookDraft:
    """The writable part of a request's endpoint."""
    return WebhookDraft(
        url=message.url,
        description=message.description,
        event_types=tuple(message.event_types),
        transform=message.transform,
        rate_limit=message.rate_limit,
        headers=dict(message.headers),
        disabled=message.disabled,
    )


def delivery(d: Delivery) -> P.WebhookDelivery:
    """The API form of a delivery with its attempts."""
    return P.WebhookDelivery(
        name=d.name,
        event=f"users/{d.user_id}/events/{d.event_id}",
        event_type=d.event_type,
        message_id=d.event_id,
        state=STATES[d.state],  # type: ignore[arg-type]
        attempt_count=d.attempt_count,
        next_attempt_time=timestamp(
            d.next_attempt_time if d.state is DeliveryState.PENDING else None
        ),
        attempts=[
            P.WebhookAttempt(
                number=a.number,
                time=timestamp(a.time),
                status_code=a.status_code,
                latency=duration(a.latency),
                response_excerpt=a.response_excerpt,
                error=a.error,
                succeeded=a.succeeded,
            )
            for a in d.attempts
        ],
        create_time=timestamp(d.create_time),
        update_time=timestamp(d.update_time),
    )


def operation(o: Operation) -> O.Operation:
    """The API form of an operation."""
    message = O.Operation(
        name=o.name,
        done=o.done,
        metadata=O.OperationMetadata(
            kind=o.kind,
            target=o.target,
            processed=o.processed,
            total=o.total,
            create_time=timestamp(o.create_time),
            update_time=timestamp(o.update_time),
            end_time=timestamp(o.end_time),
        ),
    )
    if o.done and o.error_code:
        message.error.CopyFrom(status_pb2.Status(code=int(o.error_code), message=o.error_message))
    elif o.done and o.kind == "webhook.replay":
        queued = int((o.result or {}).get("queued", 0))
        message.replay_webhook_events.CopyFrom(O.ReplayWebhookEventsResponse(queued=queued))
    return message


class WebhookApi:
    """Serves ``tunnelplane.v1.WebhookService``."""

    def __init__(self, webhooks: WebhookService) -> None:
        self._webhooks = webhooks

    async def CreateWebhook(self, request: P.CreateWebhookRequest, call: Call) -> P.Webhook:
        owner = user_id_of(request.parent, "parent", caller_id(call))
        created = await self._webhooks.create(
            owner, draft(request.webhook), request_id=request.request_id
        )
        return webhook(created, with_secret=True)

    async def GetWebhook(self, request: P.GetWebhookRequest, call: Call) -> P.Webhook:
        owner, webhook_id = webhook_parts(request.name, "name", caller_id(call))
        return webhook(await self._webhooks.get(owner, webhook_id))

    async def ListWebhooks(
        self, request: P.ListWebhooksRequest, call: Call
    ) -> P.ListWebhooksResponse:
        owner = user_id_of(request.parent, "parent", caller_id(call))
        page = await self._webhooks.list(
            owner,
            page_size=request.page_size,
            page_token=request.page_token,
            filter=request.filter,
            order_by=request.order_by,
        )
        return P.ListWebhooksResponse(
            webhooks=[webhook(w) for w in page.items], next_page_token=page.next_page_token
        )

    async def UpdateWebhook(self, request: P.UpdateWebhookRequest, call: Call) -> P.Webhook:
        owner, webhook_id = webhook_parts(request.webhook.name, "webhook.name", caller_id(call))
        paths = convert.mask_paths(request.update_mask, request.webhook, UPDATABLE_PATHS)
        updated = await self._webhooks.update(
            owner, webhook_id, draft(request.webhook), paths, etag=request.webhook.etag
        )
        return webhook(updated)

    async def DeleteWebhook(self, request: P.DeleteWebhookRequest, call: Call) -> P.Webhook:
        owner, webhook_id = webhook_parts(request.name, "name", caller_id(call))
        return webhook(await self._webhooks.delete(owner, webhook_id, etag=request.etag))

    async def RotateWebhookSecret(
        self, request: P.RotateWebhookSecretRequest, call: Call
    ) -> P.Webhook:
        owner, webhook_id = webhook_parts(request.name, "name", caller_id(call))
        return webhook(await self._webhooks.rotate_secret(owner, webhook_id), with_secret=True)

    async def ListWebhookDeliveries(
        self, request: P.ListWebhookDeliveriesRequest, call: Call
    ) -> P.ListWebhookDeliveriesResponse:
        owner, webhook_id = webhook_parts(request.parent, "parent", caller_id(call))
        page = await self._webhooks.deliveries(
            owner,
            webhook_id,
            page_size=request.page_size,
            page_token=request.page_token,
            filter=request.filter,
        )
        return P.ListWebhookDeliveriesResponse(
            deliveries=[delivery(d) for d in page.items], next_page_token=page.next_page_token
        )

    async def GetWebhookDelivery(
        self, request: P.GetWebhookDeliveryRequest, call: Call
    ) -> P.WebhookDelivery:
        owner, webhook_id, delivery_id = delivery_parts(request.name, "name", caller_id(call))
        return delivery(await self._webhooks.delivery(owner, webhook_id, delivery_id))

    async def TestWebhook(self, request: P.TestWebhookRequest, call: Call) -> P.WebhookDelivery:
        owner, webhook_id = webhook_parts(request.name, "name", caller_id(call))
        if request.data.ByteSize() > MAX_TEST_DATA:
            raise InvalidArgument.single("data", f"at most {MAX_TEST_DATA // 1024} KiB")
        data = json_format.MessageToDict(request.data)
        sent = await self._webhooks.test(owner, webhook_id, data, actor=f"users/{caller_id(call)}")
        return delivery(sent)

    async def ReplayWebhookEvents(
        self, request: P.ReplayWebhookEventsRequest, call: Call
    ) -> O.Operation:
        owner, webhook_id = webhook_parts(request.name, "name", caller_id(call))
        replay = ReplayRequest(
            event=request.event,
            start=(
                convert.from_timestamp(request.start_time, "start_time")
                if request.HasField("start_time")
                else None
            ),
            end=(
                convert.from_timestamp(request.end_time, "end_time")
                if request.HasField("end_time")
                else None
            ),
            event_types=tuple(request.event_types),
        )
        started = await self._webhooks.replay(
            owner, webhook_id, replay, request_id=request.request_id
        )
        return operation(started)

    async def RecoverWebhookDeliveries(
        self, request: P.RecoverWebhookDeliveriesRequest, call: Call
    ) -> P.RecoverWebhookDeliveriesResponse:
        owner, webhook_id = webhook_parts(request.name, "name", caller_id(call))
        if not request.HasField("start_time"):
            raise InvalidArgument.single("start_time", "is required", "REQUIRED")
        since = convert.from_timestamp(request.start_time, "start_time")
        count = await self._webhooks.recover(owner, webhook_id, since)
        return P.RecoverWebhookDeliveriesResponse(recovered=count)


class OperationApi:
    """Serves ``tunnelplane.v1.OperationService``."""

    def __init__(self, operations: OperationService, clock: Clock) -> None:
        self._operations = operations
        self._clock = clock

    async def CancelOperation(self, request: O.CancelOperationRequest, call: Call) -> O.Operation:
        owner, operation_id = operation_parts(request.name, "name", caller_id(call))
        return operation(await self._operations.cancel(owner, operation_id, self._clock.now()))

    async def GetOperation(self, request: O.GetOperationRequest, call: Call) -> O.Operation:
        owner, operation_id = operation_parts(request.name, "name", caller_id(call))
        return operation(await self._operations.get(owner, operation_id))

    async def ListOperations(
        self, request: O.ListOperationsRequest, call: Call
    ) -> O.ListOperationsResponse:
        owner = user_id_of(request.parent, "parent", caller_id(call))
        page = await self._operations.list(
            owner, page_size=request.page_size, page_token=request.page_token, filter=request.filter
        )
        return O.ListOperationsResponse(
            operations=[operation(o) for o in page.items], next_page_token=page.next_page_token
        )
