"""WebhookService."""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf import json_format
from tunnelplane.v1 import operations_pb2, webhooks_pb2

from server.api import convert
from server.api.convert import timestamp
from server.api.operations import operation
from server.api.tunnel_convert import duration
from server.api.users import caller_id
from server.domain.common.errors import InvalidArgument
from server.domain.common.names import user_id_of
from server.domain.webhooks.endpoints import delivery_parts, webhook_parts
from server.domain.webhooks.model import (
    Delivery,
    DeliveryState,
    DisabledReason,
    ReplayRequest,
    Webhook,
    WebhookDraft,
)
from server.domain.webhooks.service import UPDATABLE_PATHS, WebhookService
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


class WebhookApi:
    """Serves ``tunnelplane.v1.WebhookService``."""

    def __init__(self, webhooks: WebhookService) -> None:
        self._webhooks = webhooks

    async def CreateWebhook(self, request: P.CreateWebhookRequest, call: Call) -> P.Webhook:
        owner = user_id_of(request.parent, "parent", caller_id(call))
        created = await self._webhooks.create(
            owner, draft(request.webhook), request_id=request.request_id, trail=call.audit
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
            owner,
            webhook_id,
            draft(request.webhook),
            paths,
            etag=request.webhook.etag,
            trail=call.audit,
        )
        return webhook(updated)

    async def DeleteWebhook(self, request: P.DeleteWebhookRequest, call: Call) -> P.Webhook:
        owner, webhook_id = webhook_parts(request.name, "name", caller_id(call))
        deleted = await self._webhooks.delete(
            owner, webhook_id, etag=request.etag, trail=call.audit
        )
        return webhook(deleted)

    async def RotateWebhookSecret(
        self, request: P.RotateWebhookSecretRequest, call: Call
    ) -> P.Webhook:
        owner, webhook_id = webhook_parts(request.name, "name", caller_id(call))
        rotated = await self._webhooks.rotate_secret(owner, webhook_id, call.audit)
        return webhook(rotated, with_secret=True)

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
        sent = await self._webhooks.test(
            owner, webhook_id, data, actor=f"users/{caller_id(call)}", trail=call.audit
        )
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
            owner, webhook_id, replay, request_id=request.request_id, trail=call.audit
        )
        return operation(started)

    async def RecoverWebhookDeliveries(
        self, request: P.RecoverWebhookDeliveriesRequest, call: Call
    ) -> P.RecoverWebhookDeliveriesResponse:
        owner, webhook_id = webhook_parts(request.name, "name", caller_id(call))
        if not request.HasField("start_time"):
            raise InvalidArgument.single("start_time", "is required", "REQUIRED")
        since = convert.from_timestamp(request.start_time, "start_time")
        count = await self._webhooks.recover(owner, webhook_id, since, call.audit)
        return P.RecoverWebhookDeliveriesResponse(recovered=count)
