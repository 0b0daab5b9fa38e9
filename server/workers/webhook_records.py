"""Recording what webhook attempts got, a batch per transaction: the attempt, the delivery's
next state, the endpoint's failure record, and — on 410 or a long run of failures — the
endpoint disabled with an ``endpoint.disabled`` event and its pending deliveries failed.

A result is recorded only while its claim still holds the delivery (the claim token):
one whose lease ran out may have been claimed and sent again elsewhere, and the newer
claim records instead (see :meth:`SqlWebhookRepository.finish`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from prometheus_client import Counter

from server.domain.audit.model import AuditEntry
from server.domain.common.clock import Clock
from server.domain.common.ids import new_id
from server.domain.events.model import Event
from server.domain.events.ports import EventBus
from server.domain.events.service import record
from server.domain.unit_of_work import UnitOfWork, UnitOfWorkFactory
from server.domain.webhooks.model import (
    DISABLED_EVENT,
    Attempt,
    Claimed,
    DeliveryState,
    DisabledReason,
    Finished,
    Settlement,
    Webhook,
    delivery_name,
)
from server.domain.webhooks.rules import should_disable

log = logging.getLogger("tunnelplane.webhooks")

_LABELS = {
    DeliveryState.SUCCEEDED: "succeeded",
    DeliveryState.PENDING: "retrying",
    DeliveryState.FAILED: "failed",
}


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one claimed delivery's attempt came to (``attempt`` None: not sent)."""

    claimed: Claimed
    webhook: Webhook
    event: Event
    attempt: Attempt | None
    settlement: Settlement


class ResultRecorder:
    """Writes batches of :class:`Outcome` and judges their endpoints."""

    def __init__(
        self,
        uow: UnitOfWorkFactory,
        bus: EventBus,
        clock: Clock,
        disable_after: timedelta,
        counter: Counter,
    ) -> None:
        self._uow = uow
        self._bus = bus
        self._clock = clock
        self._disable_after = disable_after
        self._counter = counter

    async def record(self, outcomes: Sequence[Outcome]) -> None:
        """Record ``outcomes`` in one transaction (those whose claims still hold)."""
        if not outcomes:
            return
        now = self._clock.now()
        async with self._uow() as uow:
            held = await uow.webhooks.finish([_finished(o) for o in outcomes], now)
            recorded = [o for o in outcomes if o.claimed.delivery_id in held]
            await uow.webhooks.succeeded(
                sorted({o.webhook.id for o in recorded if o.settlement.endpoint_ok})
            )
            for webhook in {o.webhook.id: o.webhook for o in recorded}.values():
                mine = [o.settlement for o in recorded if o.webhook.id == webhook.id]
                await self._judge_endpoint(uow, webhook, mine, now)
            await uow.audit.add_many(
                [
                    _audit_entry(o, now)
                    for o in recorded
                    if o.settlement.state is not DeliveryState.PENDING
                ]
            )
        for o in recorded:
            if o.attempt is not None or o.settlement.state is not DeliveryState.PENDING:
                # (Unsent and still pending: put off by an open breaker, counted there.)
                self._counter.labels(_LABELS[o.settlement.state]).inc()

    async def _judge_endpoint(
        self, uow: UnitOfWork, webhook: Webhook, settled: list[Settlement], now: datetime
    ) -> None:
        """Disable the endpoint on 410, or once it has failed for ``disable_after``."""
        reason = next((s.disable for s in settled if s.disable is not None), None)
        failed = any(s.endpoint_failed for s in settled)
        if reason is None and failed and not any(s.endpoint_ok for s in settled):
            since = await uow.webhooks.failing(webhook.id, now)
            if should_disable(since, now, self._disable_after):
                reason = DisabledReason.FAILING
        if reason is None or not await uow.webhooks.disable(webhook.id, reason, now):
            return
        dropped = await uow.webhooks.fail_pending(webhook.id, now)
        log.warning(
            "webhook endpoint disabled",
            extra={"webhook": webhook.id, "reason": reason.value, "dropped": dropped},
        )
        await record(
            uow,
            self._bus,
            self._clock,
            DISABLED_EVENT,
            subject=webhook.name,
            user_id=webhook.user_id,
            payload={"name": webhook.name, "url": webhook.url, "reason": reason.value},
        )


def _finished(o: Outcome) -> Finished:
    return Finished(
        o.claimed.delivery_id,
        o.claimed.token,
        o.settlement.state,
        o.settlement.next_attempt_time,
        o.attempt,
    )


def _audit_entry(o: Outcome, now: datetime) -> AuditEntry:
    attempt = o.attempt
    return AuditEntry(
        id=new_id("aud", now.timestamp()),
        time=now,
        method="webhook.delivery",
        action="webhook.deliver",
        outcome="OK" if o.settlement.state is DeliveryState.SUCCEEDED else "FAILED",
        subject_user_id=o.webhook.user_id,
        resource=delivery_name(o.webhook.user_id, o.webhook.id, o.claimed.delivery_id),
        details={
            "event": o.event.name,
            "event_type": o.event.type,
            "attempts": 0 if attempt is None else attempt.number,
            "status_code": 0 if attempt is None else attempt.status_code,
            "error": "" if attempt is None else attempt.error,
            "test": o.claimed.test,
        },
    )
