"""Webhooks: endpoints, and the dispatcher that delivers their outbox (claim and record
loops), with the one-off sealing of headers stored in the clear."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

from server.compose.events import EventsArea
from server.compose.infrastructure import Infrastructure
from server.domain.common.addresses import public_only
from server.domain.webhooks.endpoints import WebhookPolicy
from server.domain.webhooks.service import WebhookService
from server.settings import Settings
from server.storage.database import Database
from server.storage.tracing import http_trace_config
from server.workers.supervisor import Loop
from server.workers.webhook_http import WebhookSender
from server.workers.webhook_metrics import DispatchMetrics
from server.workers.webhooks import (
    DispatchSettings,
    WebhookDispatcher,
    dispatch_loops,
    headers_loop,
)


@dataclass
class WebhooksArea:
    """Webhook endpoints and their delivery."""

    settings: Settings
    db: Database
    webhooks: WebhookService
    dispatcher: WebhookDispatcher
    sender: WebhookSender

    def loops(self) -> Sequence[Loop]:
        """The sealing of old headers, and the dispatcher's loops (unless this process is
        told not to dispatch)."""
        dispatching = dispatch_loops(self.dispatcher) if self.settings.webhook_dispatch else []
        return [headers_loop(self.db), *dispatching]

    async def aclose(self) -> None:
        """Close the sender's connections."""
        await self.sender.close()


def build(
    infra: Infrastructure, events: EventsArea, operation_started: Callable[[], None]
) -> WebhooksArea:
    """Webhooks over ``infra``; the dispatcher wakes on every event this process hears, and
    a replay started calls ``operation_started``."""
    settings, db = infra.settings, infra.db
    sender = WebhookSender(
        timeout=settings.webhook_timeout,
        # Endpoints are URLs users type: in production only global addresses are dialled,
        # checked after DNS on every new connection (SSRF, DNS rebinding).
        allow=public_only if settings.webhook_public_only else None,
        max_connections=settings.webhook_concurrency,
        trace_configs=[http_trace_config(infra.tracer_provider)]
        if settings.otel_exporter != "none"
        else (),
    )
    dispatcher = WebhookDispatcher(
        db,
        sender,
        events.bus,
        infra.clock,
        _dispatch_settings(settings),
        DispatchMetrics(infra.registry),
        breakers=infra.breakers,
    )
    events.local_bus.listen(dispatcher.wake)
    webhooks = WebhookService(
        db,
        events.bus,
        infra.lister,
        infra.clock,
        WebhookPolicy(
            require_https=settings.mode == "production",
            max_webhooks=settings.webhook_max_per_user,
            public_only=settings.webhook_public_only,
        ),
        sender=dispatcher,
        operation_started=operation_started,
    )
    return WebhooksArea(settings, db, webhooks, dispatcher, sender)


def _dispatch_settings(settings: Settings) -> DispatchSettings:
    return DispatchSettings(
        batch=settings.webhook_batch,
        concurrency=settings.webhook_concurrency,
        endpoint_concurrency=settings.webhook_endpoint_concurrency,
        lease=settings.webhook_claim_lease,
        schedule=tuple(timedelta(seconds=s) for s in settings.webhook_schedule),
        disable_after=timedelta(seconds=settings.webhook_disable_after),
    )
