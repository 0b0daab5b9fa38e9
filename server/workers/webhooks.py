"""The webhook dispatcher: claims due deliveries from the outbox, sends them, records what
happened.

One round: claim up to ``batch`` due deliveries (a lease, see
:mod:`server.storage.webhooks`), load their endpoints and events, hold back those over their
endpoint's rate limit (they get their send time and are released), send the rest
concurrently, and record every result in one transaction: the attempt, the delivery's
next state, the endpoint's failure record, and — on 410 or five days of failures — the
endpoint disabled with an ``endpoint.disabled`` event. Any number of replicas may run this
loop on one PostgreSQL; SQLite runs it in its one process.

Crash safety comes from the lease: a dispatcher killed mid-send never records its result,
so the delivery comes due again when the lease ends and is sent again with the same
``webhook-id`` (at least once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from server.domain.clock import Clock
from server.domain.delivery import Claimed, Finished, Request, Settlement, render, settle
from server.domain.entities import AuditEntry
from server.domain.events import Event, EventBus, record
from server.domain.ids import new_id
from server.domain.outbox import DeliveryState
from server.domain.ports import UnitOfWork, UnitOfWorkFactory
from server.domain.webhook_service import (
    DISABLED_EVENT,
    Attempt,
    DisabledReason,
    Webhook,
    delivery_name,
)
from server.domain.webhooks import DISABLE_AFTER, RETRY_SCHEDULE, should_disable
from server.errors import DomainError
from server.workers.webhook_http import AttemptResult, WebhookSender

log = logging.getLogger("tunnelplane.webhooks")

#: A delivery whose rate-limited send time is this close is sent in this round.
SLOT_SLACK = timedelta(milliseconds=5)


@dataclass(frozen=True, slots=True)
class DispatchSettings:
    """How the dispatcher works."""

    batch: int = 100
    #: Requests in flight at once, per process.
    concurrency: int = 100
    #: How long a claim holds a delivery; longer than the send timeout.
    lease: float = 60.0
    #: Longest sleep while nothing is due (new events wake the loop sooner).
    poll_interval: float = 1.0
    schedule: tuple[timedelta, ...] = RETRY_SCHEDULE
    disable_after: timedelta = DISABLE_AFTER


class DispatchMetrics:
    """Prometheus metrics of webhook delivery."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.deliveries = Counter(
            "tunnelplane_webhook_deliveries",
            "Delivery attempts by result (succeeded, retrying, failed) and deliveries "
            "held back by an endpoint's rate limit (postponed).",
            ["result"],
            registry=registry,
        )
        self.latency = Histogram(
            "tunnelplane_webhook_attempt_seconds",
            "Time from sending a webhook to its answer (or failure).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15),
            registry=registry,
        )
        self.queue_depth = Gauge(
            "tunnelplane_webhook_queue_depth", "Deliveries due now.", registry=registry
        )
        self.oldest_due = Gauge(
            "tunnelplane_webhook_oldest_due_seconds",
            "How long the oldest due delivery has been waiting.",
            registry=registry,
        )


@dataclass(frozen=True, slots=True)
class _Outcome:
    claimed: Claimed
    webhook: Webhook
    event: Event
    attempt: Attempt | None
    settlement: Settlement


class WebhookDispatcher:
    """Delivers due webhooks; see the module docstring."""

    def __init__(
        self,
        uow: UnitOfWorkFactory,
        sender: WebhookSender,
        bus: EventBus,
        clock: Clock,
        settings: DispatchSettings,
        metrics: DispatchMetrics,
        rng: random.Random | None = None,
    ) -> None:
        self._uow = uow
        self._sender = sender
        self._bus = bus
        self._clock = clock
        self._settings = settings
        self._metrics = metrics
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._wake = asyncio.Event()
        self._stats_at = 0.0

    def wake(self, _event: object = None) -> None:
        """Look for due work now (an event was recorded)."""
        self._wake.set()

    async def run_once(self) -> int:
        """One round; the number of deliveries claimed."""
        now = self._clock.now()
        lease = now + timedelta(seconds=self._settings.lease)
        async with self._uow() as uow:
            claimed = await uow.webhooks.claim(now, lease, self._settings.batch, _token())
            hooks, events = await _load(uow, claimed)
        if claimed:
            await self._deliver(claimed, hooks, events)
        return len(claimed)

    async def deliver_now(self, delivery_id: str) -> None:
        """Attempt one pending delivery at once (a test send)."""
        lease = self._clock.now() + timedelta(seconds=self._settings.lease)
        async with self._uow() as uow:
            claimed = await uow.webhooks.claim_one(delivery_id, lease, _token())
            found = [] if claimed is None else [claimed]
            hooks, events = await _load(uow, found)
        if found:
            await self._deliver(found, hooks, events, rate_limit=False)

    async def run(self, paused: asyncio.Lock | None = None) -> None:
        """Deliver until cancelled. Each round holds ``paused`` (when given)."""
        hold = paused or contextlib.nullcontext()
        while True:
            idle = self._settings.poll_interval
            self._wake.clear()  # before the round: an event during it wakes the next
            try:
                async with hold:
                    claimed = await self.run_once()
                    await self._update_stats()
                if claimed:
                    continue  # there may be more: look again at once
                idle = await self._idle_time()
            except Exception:
                log.exception("webhook dispatch failed; will retry")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(idle):
                    await self._wake.wait()

    async def _idle_time(self) -> float:
        """How long to sleep: until the next delivery is due, at most a poll interval."""
        async with self._uow(readonly=True) as uow:
            due = await uow.webhooks.next_due()
        if due is None:
            return self._settings.poll_interval
        wait = (due - self._clock.now()).total_seconds()
        return min(max(wait, 0.0), self._settings.poll_interval)

    async def _update_stats(self) -> None:
        now = self._clock.time()
        if now - self._stats_at < 5.0:
            return
        self._stats_at = now
        at = self._clock.now()
        async with self._uow(readonly=True) as uow:
            depth, oldest = await uow.webhooks.queue_stats(at)
        self._metrics.queue_depth.set(depth)
        self._metrics.oldest_due.set(0.0 if oldest is None else (at - oldest).total_seconds())

    # -- one round -------------------------------------------------------------------------

    async def _deliver(
        self,
        claimed: Sequence[Claimed],
        hooks: dict[str, Webhook],
        events: dict[str, Event],
        *,
        rate_limit: bool = True,
    ) -> None:
        ready = [c for c in claimed if c.webhook_id in hooks and c.event_id in events]
        if rate_limit:
            ready = await self._hold_back(ready, hooks)
        results = await asyncio.gather(
            *(self._attempt(c, hooks[c.webhook_id], events[c.event_id]) for c in ready)
        )
        await self._record(results)

    async def _hold_back(self, claimed: list[Claimed], hooks: dict[str, Webhook]) -> list[Claimed]:
        """Those of ``claimed`` that their endpoints' rate limits let through now; the rest
        are released with the time their turn comes."""
        limited: dict[str, list[Claimed]] = {}
        for c in claimed:
            if hooks[c.webhook_id].rate_limit > 0 and not hooks[c.webhook_id].disabled:
                limited.setdefault(c.webhook_id, []).append(c)
        if not limited:
            return claimed
        held: set[str] = set()
        now = self._clock.now()
        async with self._uow() as uow:
            for webhook_id, group in limited.items():
                interval = 1.0 / hooks[webhook_id].rate_limit
                until = now + SLOT_SLACK
                slots = await uow.webhooks.take_slots(webhook_id, len(group), now, interval, until)
                for c, slot in zip(group, slots, strict=True):
                    if slot > until:
                        await uow.webhooks.release(c.delivery_id, c.token, slot)
                        held.add(c.delivery_id)
        if held:
            self._metrics.deliveries.labels("postponed").inc(len(held))
        return [c for c in claimed if c.delivery_id not in held]

    async def _attempt(self, claimed: Claimed, webhook: Webhook, event: Event) -> _Outcome:
        now = self._clock.now()
        number = claimed.attempt_count + 1
        if webhook.disabled and not claimed.test:
            return _Outcome(claimed, webhook, event, None, Settlement(DeliveryState.FAILED, None))
        try:
            request = render(webhook, event, now)
        except DomainError as exc:  # a transformation that fails, a payload too large
            attempt = Attempt(number, now, 0, 0.0, "", str(exc)[:300], succeeded=False)
            failed = Settlement(DeliveryState.FAILED, None, endpoint_failed=not claimed.test)
            return _Outcome(claimed, webhook, event, attempt, failed)
        result = await self._send(request)
        settlement = settle(
            number,
            result.status,
            result.error,
            result.retry_after,
            self._clock.now(),
            test=claimed.test,
            rng=self._rng,
            schedule=self._settings.schedule,
        )
        attempt = Attempt(
            number,
            now,
            result.status or 0,
            result.latency,
            result.excerpt,
            result.error[:300],
            settlement.state is DeliveryState.SUCCEEDED,
        )
        self._metrics.latency.observe(result.latency)
        log.debug(
            "webhook attempt",
            extra={
                "delivery": claimed.delivery_id,
                "webhook": webhook.id,
                "attempt": number,
                "status_code": result.status or 0,
                "latency_ms": round(result.latency * 1000, 1),
                "state": settlement.state.value,
            },
        )
        return _Outcome(claimed, webhook, event, attempt, settlement)

    async def _send(self, request: Request) -> AttemptResult:
        async with self._slots:
            return await self._sender.send(request.url, request.body, request.headers)

    async def _record(self, outcomes: Sequence[_Outcome]) -> None:
        if not outcomes:
            return
        now = self._clock.now()
        async with self._uow() as uow:
            held = await uow.webhooks.finish(
                [
                    Finished(
                        o.claimed.delivery_id,
                        o.claimed.token,
                        o.settlement.state,
                        o.settlement.next_attempt_time,
                        o.attempt,
                    )
                    for o in outcomes
                ],
                now,
            )
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
            label = {
                DeliveryState.SUCCEEDED: "succeeded",
                DeliveryState.PENDING: "retrying",
                DeliveryState.FAILED: "failed",
            }[o.settlement.state]
            self._metrics.deliveries.labels(label).inc()

    async def _judge_endpoint(
        self, uow: UnitOfWork, webhook: Webhook, settled: list[Settlement], now: datetime
    ) -> None:
        """Disable the endpoint on 410, or once it has failed for ``disable_after``."""
        reason = next((s.disable for s in settled if s.disable is not None), None)
        failed = any(s.endpoint_failed for s in settled)
        if reason is None and failed and not any(s.endpoint_ok for s in settled):
            since = await uow.webhooks.failing(webhook.id, now)
            if should_disable(since, now, self._settings.disable_after):
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


async def _load(
    uow: UnitOfWork, claimed: Sequence[Claimed]
) -> tuple[dict[str, Webhook], dict[str, Event]]:
    """The endpoints and events of ``claimed``, read from the primary (a replica might
    not have the events yet)."""
    if not claimed:
        return {}, {}
    hooks = await uow.webhooks.by_ids(sorted({c.webhook_id for c in claimed}))
    events = await uow.events.by_ids(sorted({c.event_id for c in claimed}))
    return {w.id: w for w in hooks}, {e.id: e for e in events}


def _token() -> int:
    return secrets.randbits(62) + 1


def _audit_entry(o: _Outcome, now: datetime) -> AuditEntry:
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
