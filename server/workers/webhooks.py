"""The webhook dispatcher: claims due deliveries from the outbox, sends them, records what
happened.

It dispatches continuously. The claim loop claims due deliveries (a lease, see
:mod:`server.storage.webhooks.deliveries`) as long as there is room: at most ``concurrency``
requests in flight in the process and ``endpoint_concurrency`` per endpoint, so that a slow or dead
receiver holds only its own few slots and every other endpoint keeps being served.
Deliveries over their endpoint's rate limit are held back (they get their send time and
are released). Each claimed delivery is sent as a task of its own; results are recorded as
they land, in batches (:mod:`server.workers.webhook_records`), never waiting for a slower
send. Any number of replicas may run this loop on one PostgreSQL; SQLite runs it in its
one process. The per-endpoint limit is per process.

An endpoint whose stored secret or headers do not open (sealed under a key this process
is not given) holds up only its own deliveries: they wait for their leases, counted as
``unreadable``, and are claimed again then (so a corrected key sends them).

Nothing orders the requests one endpoint receives (a retry overtakes later events anyway):
receivers order by the payload's ``timestamp`` and drop duplicates by ``webhook-id``.

Crash safety comes from the lease, longer than the send timeout (the settings insist), so
that a send in flight is never claimed again by another replica: a dispatcher killed
mid-send never records its result, so the delivery comes due again when the lease ends and
is sent again with the same ``webhook-id`` (at least once). A dispatcher that is stopped
releases the deliveries it did not finish, for another replica to send at once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import secrets
from collections import Counter as Tally
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

from server.domain.common.clock import Clock
from server.domain.common.errors import DomainError
from server.domain.events.model import Event
from server.domain.events.ports import EventBus
from server.domain.unit_of_work import UnitOfWork, UnitOfWorkFactory
from server.domain.webhooks.delivery import render, settle
from server.domain.webhooks.model import (
    Attempt,
    Claimed,
    DeliveryState,
    Request,
    Settlement,
    Webhook,
)
from server.domain.webhooks.rules import DISABLE_AFTER, RETRY_SCHEDULE
from server.resilience.breakers import BreakerOpenError, Breakers
from server.workers.supervisor import Loop
from server.workers.webhook_http import AttemptResult, UnansweredError, WebhookSender, answered
from server.workers.webhook_metrics import DispatchMetrics
from server.workers.webhook_records import Outcome, ResultRecorder

log = logging.getLogger("tunnelplane.webhooks")

#: A delivery whose rate-limited send time is this close is sent now.
SLOT_SLACK = timedelta(milliseconds=5)
#: The shortest sleep while something is due that could not be claimed (rows another
#: replica is claiming at this moment): not a busy loop.
MIN_IDLE = 0.01
#: Under load sends land one by one; a claim or a record for each would cost a transaction
#: per delivery, so when only a few have landed the loop lets more land for this long.
GATHER = 0.005


@dataclass(frozen=True, slots=True)
class DispatchSettings:
    """How the dispatcher works."""

    #: Most deliveries claimed at once.
    batch: int = 100
    #: Requests in flight at once, per process.
    concurrency: int = 100
    #: Requests in flight at once to one endpoint, per process.
    endpoint_concurrency: int = 4
    #: How long a claim holds a delivery; longer than the send timeout.
    lease: float = 60.0
    #: Longest sleep while nothing is due (new events wake the loop sooner).
    poll_interval: float = 1.0
    schedule: tuple[timedelta, ...] = RETRY_SCHEDULE
    disable_after: timedelta = DISABLE_AFTER


@dataclass(frozen=True, slots=True)
class _Claim:
    #: Deliveries claimed (those held back by a rate limit included).
    count: int
    #: Those to send now, with their endpoints and events.
    ready: list[Claimed]
    hooks: dict[str, Webhook]
    events: dict[str, Event]
    #: Nothing claimable was left behind.
    seen_all: bool


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
        breakers: Breakers | None = None,
    ) -> None:
        #: One breaker per endpoint: while open, its deliveries wait, unsent.
        self._breakers = breakers
        self._uow = uow
        self._sender = sender
        self._clock = clock
        self._settings = settings
        self._metrics = metrics
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._records = ResultRecorder(uow, bus, clock, settings.disable_after, metrics.deliveries)
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._wake = asyncio.Event()
        self._stats_at = 0.0
        #: Requests in flight, per endpoint; their claims.
        self._busy: Tally[str] = Tally()
        self._flights: dict[asyncio.Task[Outcome], Claimed] = {}
        #: Results waiting to be recorded, and the signal that some are.
        self._landed: list[Outcome] = []
        self._landing = asyncio.Event()
        self._wake_timer: asyncio.TimerHandle | None = None
        #: Endpoints that do not open (see :meth:`_set_aside`), until when (clock time).
        self._unreadable: dict[str, float] = {}

    def wake(self, _event: object = None) -> None:
        """Look for due work now (an event was recorded, or a slot came free)."""
        self._wake.set()

    @property
    def in_flight(self) -> int:
        """Requests this dispatcher has in flight."""
        return sum(self._busy.values())

    async def run_once(self) -> int:
        """One round, all of it awaited: claim what is due (within the concurrency
        limits), send it, record every result; the number of deliveries claimed."""
        got = await self._claim(self._settings.batch)
        flights = [self._fly(c, got.hooks[c.webhook_id], got.events[c.event_id]) for c in got.ready]
        await self._records.record(await asyncio.gather(*flights))
        return got.count

    async def deliver_now(self, delivery_id: str) -> None:
        """Attempt one pending delivery at once (a test send)."""
        lease = self._clock.now() + timedelta(seconds=self._settings.lease)
        async with self._uow() as uow:
            claimed = await uow.webhooks.claim_one(delivery_id, lease, _token())
            found = [] if claimed is None else [claimed]
            hooks, events = await _load(uow, found)
        outcomes = [
            await self._attempt(c, hooks[c.webhook_id], events[c.event_id])
            for c in found
            if c.webhook_id in hooks and c.event_id in events
        ]
        await self._records.record(outcomes)

    @property
    def wakeup(self) -> asyncio.Event:
        """Set when there may be due work (see :meth:`wake`): it ends the claim loop's pause."""
        return self._wake

    async def step(self) -> float:
        """One round of the claim loop (:func:`dispatch_loops`): claim what there is room
        for and start sending it; the pause before the next round (0: at once)."""
        more = await self._fill()
        await self._update_stats()
        if more:
            return 0.0  # what is claimable was not all seen: look again at once
        return await self._idle_time()

    # -- claiming --------------------------------------------------------------------------

    async def _fill(self) -> bool:
        """Claim as many due deliveries as there is room for and start sending them;
        whether more may be claimable now."""
        room = self._room()
        if room <= 0:
            return False  # a landing send wakes the loop
        got = await self._claim(room)
        for c in got.ready:
            flight = self._fly(c, got.hooks[c.webhook_id], got.events[c.event_id])
            task = asyncio.create_task(flight)
            self._flights[task] = c
            task.add_done_callback(self._land)
        return not got.seen_all

    def _wake_soon(self) -> None:
        """Wake the claim loop in :data:`GATHER`: the room of every send that lands
        meanwhile is claimed in one go."""
        if self._wake_timer is None:
            loop = asyncio.get_running_loop()
            self._wake_timer = loop.call_later(GATHER, self._woken)

    def _woken(self) -> None:
        self._wake_timer = None
        self.wake()

    def _room(self) -> int:
        return min(self._settings.batch, self._settings.concurrency - self.in_flight)

    def _few(self) -> int:
        return max(1, self._settings.batch // 4)

    async def _claim(self, limit: int) -> _Claim:
        """Claim up to ``limit`` due deliveries within the per-endpoint limit; those to
        send now are counted in flight at once."""
        now = self._clock.now()
        lease = now + timedelta(seconds=self._settings.lease)
        async with self._uow() as uow:
            claimed, seen_all = await uow.webhooks.claim_fairly(
                now,
                lease,
                limit,
                _token(),
                per_endpoint=self._settings.endpoint_concurrency,
                busy=self._claim_busy(),
            )
            hooks, events = await _load(uow, claimed)
        self._set_aside([c for c in claimed if c.webhook_id not in hooks])
        ready = [c for c in claimed if c.webhook_id in hooks and c.event_id in events]
        ready = await self._hold_back(ready, hooks)
        self._busy.update(c.webhook_id for c in ready)
        self._metrics.in_flight.set(self.in_flight)
        return _Claim(len(claimed), ready, hooks, events, seen_all)

    def _claim_busy(self) -> Mapping[str, int]:
        """Requests in flight per endpoint, with the endpoints set aside counted as full."""
        now = self._clock.time()
        self._unreadable = {w: until for w, until in self._unreadable.items() if until > now}
        if not self._unreadable:
            return self._busy
        full = dict.fromkeys(self._unreadable, self._settings.endpoint_concurrency)
        return {**self._busy, **full}

    def _set_aside(self, unreadable: Sequence[Claimed]) -> None:
        """Deliveries whose endpoint does not open (its sealed secret or headers, under a
        secrets key this process lacks) wait for their leases to end, counted; until then
        their endpoint is not claimed from, so its backlog takes no other endpoint's turn."""
        if not unreadable:
            return
        self._metrics.deliveries.labels("unreadable").inc(len(unreadable))
        until = self._clock.time() + self._settings.lease
        self._unreadable.update(dict.fromkeys((c.webhook_id for c in unreadable), until))

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

    async def _idle_time(self) -> float:
        """How long to sleep once everything claimable now is claimed: until the next
        delivery comes due, at most a poll interval. What is due now but waits for its
        endpoint's room is not looked at: a landing send of that endpoint wakes the loop."""
        if self.in_flight >= self._settings.concurrency:
            return self._settings.poll_interval
        now = self._clock.now()
        async with self._uow(readonly=True) as uow:
            due = await uow.webhooks.next_due(after=now)
        if due is None:
            return self._settings.poll_interval
        wait = (due - now).total_seconds()
        return min(max(wait, MIN_IDLE), self._settings.poll_interval)

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

    # -- sending ---------------------------------------------------------------------------

    async def _fly(self, claimed: Claimed, webhook: Webhook, event: Event) -> Outcome:
        """One claimed delivery's attempt; its slot is given back when it lands."""
        try:
            return await self._attempt(claimed, webhook, event)
        finally:
            limits = self._settings
            was_full = (
                self.in_flight >= limits.concurrency
                or self._busy[claimed.webhook_id] >= limits.endpoint_concurrency
            )
            self._busy[claimed.webhook_id] -= 1
            if self._busy[claimed.webhook_id] <= 0:
                del self._busy[claimed.webhook_id]
            self._metrics.in_flight.set(self.in_flight)
            if was_full:
                self._wake_soon()  # the claim loop may have been waiting for this room

    async def _attempt(self, claimed: Claimed, webhook: Webhook, event: Event) -> Outcome:
        now = self._clock.now()
        number = claimed.attempt_count + 1
        if webhook.disabled and not claimed.test:
            return Outcome(claimed, webhook, event, None, Settlement(DeliveryState.FAILED, None))
        try:
            request = render(webhook, event, now)
        except DomainError as exc:  # a transformation that fails, a payload too large
            attempt = Attempt(number, now, 0, 0.0, "", str(exc)[:300], succeeded=False)
            failed = Settlement(DeliveryState.FAILED, None, endpoint_failed=not claimed.test)
            return Outcome(claimed, webhook, event, attempt, failed)
        try:
            result = await self._guarded_send(request, webhook.id, test=claimed.test)
        except BreakerOpenError as opened:  # unsent: it waits for the breaker's trial time
            self._metrics.deliveries.labels("breaker_open").inc()
            later = self._clock.now() + timedelta(seconds=opened.retry_in)
            return Outcome(claimed, webhook, event, None, Settlement(DeliveryState.PENDING, later))
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
        return Outcome(claimed, webhook, event, attempt, settlement)

    async def _guarded_send(
        self, request: Request, webhook_id: str, *, test: bool
    ) -> AttemptResult:
        """Send under the endpoint's breaker: an unanswered attempt (no status, a timeout, a
        5xx or a 429) counts against it, any other answer shows the endpoint is there. A
        test send goes out whatever the breaker says, and does not move it."""
        if self._breakers is None or test:
            return await self._send(request)
        try:
            async with self._breakers.guard("webhook", webhook_id):
                result = answered(await self._send(request))
        except UnansweredError as unanswered:
            return unanswered.result
        return result

    async def _send(self, request: Request) -> AttemptResult:
        async with self._slots:
            return await self._sender.send(request.url, request.body, request.headers)

    # -- recording -------------------------------------------------------------------------

    def _land(self, task: asyncio.Task[Outcome]) -> None:
        """A send task ended: queue its result for recording."""
        self._flights.pop(task, None)
        if task.cancelled():
            return
        if (failure := task.exception()) is not None:
            log.error("a webhook attempt failed", exc_info=failure)
            return  # its lease brings the delivery back
        self._landed.append(task.result())
        self._landing.set()

    async def record_landed(self) -> None:
        """One round of the recording loop: wait for results to land and record whatever
        landed meanwhile in one transaction, so a slow send never holds back the others'
        records. If the write fails, their leases bring the deliveries back (sent again:
        at least once)."""
        await self._landing.wait()
        if len(self._landed) < self._few() and self._flights:
            await asyncio.sleep(GATHER)  # record what lands meanwhile with them
        self._landing.clear()
        batch, self._landed = self._landed, []
        await self._records.record(batch)

    async def _record_now(self) -> None:
        batch, self._landed = self._landed, []
        try:
            await self._records.record(batch)
        except Exception:
            # Their leases bring the deliveries back: sent again, at least once.
            log.exception("recording webhook results failed", extra={"results": len(batch)})

    async def drain(self) -> None:
        """The loops have stopped: cancel the sends in flight, record what landed, and
        release the rest at once (rather than at the end of their leases)."""
        if self._wake_timer is not None:
            self._wake_timer.cancel()
        unfinished = list(self._flights.items())
        for task, _ in unfinished:
            task.cancel()
        await asyncio.gather(*(t for t, _ in unfinished), return_exceptions=True)
        await self._record_now()
        released = [c for t, c in unfinished if t.cancelled()]
        if not released:
            return
        now = self._clock.now()
        try:
            async with self._uow() as uow:
                for c in released:
                    await uow.webhooks.release(c.delivery_id, c.token, now)
        except Exception:
            log.exception("releasing unfinished webhook deliveries failed")


def dispatch_loops(dispatcher: WebhookDispatcher) -> list[Loop]:
    """The recording loop, then the claim loop (which so stops and drains first; its step
    names every pause)."""
    return [
        Loop("webhook-records", dispatcher.record_landed, 0.0),
        Loop("webhooks", dispatcher.step, 0.0, wake=dispatcher.wakeup, drain=dispatcher.drain),
    ]


async def seal_plain_headers(uow: UnitOfWorkFactory, batch: int = 200) -> None:
    """Seal the custom headers that rows written before migration 0008 hold in the clear
    (sealing a row twice is harmless)."""
    while True:
        async with uow() as work:
            looked = await work.webhooks.seal_plain_headers(batch)
        if looked < batch:
            return


def headers_loop(uow: UnitOfWorkFactory) -> Loop:
    """:func:`seal_plain_headers`, once at start-up, on every replica."""
    return Loop("webhook-headers", functools.partial(seal_plain_headers, uow), 0.0, once=True)


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
