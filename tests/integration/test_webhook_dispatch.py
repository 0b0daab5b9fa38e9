"""The webhook dispatcher (server/workers/webhooks.py) end to end: a real database (SQLite
and PostgreSQL, one of its own per test), real HTTP to a scriptable loopback receiver, the
real sender, and a clock the test moves: a retry is reached by moving the clock to its
``next_attempt_time`` and running a round, never by waiting for it.

No outcome here depends on how fast the event loop runs. The receiver shares the loop
with the sender, and a loop that stalls (a busy CI machine, a garbage collection, another
server's work in the same test process) makes any answer late: with a short send timeout, a
stall after the receiver logged a 200 turned that answer into a timeout, which at-least-once
delivery then rightly sent again (a receiver got an ``endpoint.disabled`` notice twice). So
the sender keeps its production timeout, which no answer here comes near, and "no answer"
is scripted as a connection closed without a response, not as a race against a clock.

Plan Property 13 (at-least-once delivery on the schedule, a faithful history, valid
signatures) is checked with Hypothesis; disabling (410 and continuous failure), the failure
record, exhausted schedules, Retry-After, lease expiry, stale claims and the per-endpoint
rate limit with focused examples.
"""

from __future__ import annotations

import json
import os
import random
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import event as count_case
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from standardwebhooks.webhooks import Webhook as StandardWebhook

from server.domain.common.ids import new_id
from server.domain.common.listing import ListQuery, OrderKey
from server.domain.events.bus import MemoryBus
from server.domain.events.model import Event
from server.domain.events.service import record
from server.domain.identity.model import Preferences, Role, Tier, User, UserState
from server.domain.webhooks.delivery import render
from server.domain.webhooks.endpoints import SUBSCRIBABLE
from server.domain.webhooks.model import (
    DISABLED_EVENT,
    Attempt,
    Delivery,
    DeliveryState,
    DisabledReason,
    Finished,
    Webhook,
)
from server.domain.webhooks.rules import RETRY_AFTER_STATUSES, matches, new_secret, validate_filters
from server.domain.webhooks.rules import verify as domain_verify
from server.storage.database import Database
from server.storage.sealing import Sealer
from server.storage.tables import webhook_attempts
from server.storage.tables import webhooks as webhooks_table
from server.workers.webhook_http import WebhookSender
from server.workers.webhooks import DispatchMetrics, DispatchSettings, WebhookDispatcher
from tests.conftest import Backend, own_database
from tests.webhook_receiver import Receiver, Reply, Seen

#: What the receiver logs for a request it closed the connection on, without an answer.
NO_ANSWER = 0
#: The sender's error for it.
NO_ANSWER_ERROR = "connection closed before a response"
SCHEDULE = (timedelta(seconds=1), timedelta(seconds=2), timedelta(seconds=4))
SECOND = timedelta(seconds=1)


class ManualClock:
    """A clock that moves only when told to (it starts at the real time, so that the
    independent verifier's five-minute tolerance holds for what it stamps)."""

    def __init__(self) -> None:
        self._now = datetime.now(UTC)

    def now(self) -> datetime:
        return self._now

    def time(self) -> float:
        return self._now.timestamp()

    def set(self, moment: datetime) -> None:
        self._now = moment

    def advance(self, delta: timedelta) -> None:
        self._now += delta

    def reach(self, moment: datetime) -> None:
        """Move forward to ``moment`` (never back)."""
        self._now = max(self._now, moment)


@dataclass
class Rig:
    """A migrated database of its own, a receiver, a sender, a bus that remembers every
    event it published, and the clock; plus helpers to build users, endpoints and events
    directly through the domain and storage layers (no gRPC server)."""

    db: Database
    clock: ManualClock
    bus: MemoryBus
    rx: Receiver
    sender: WebhookSender
    heard: list[Event] = field(default_factory=list)

    def dispatcher(
        self, seed: int = 0, registry: CollectorRegistry | None = None, **overrides: Any
    ) -> WebhookDispatcher:
        values: dict[str, Any] = {
            "batch": 100,
            "concurrency": 20,
            # One round sends everything due here; the limit has tests of its own
            # (tests/integration/test_webhook_concurrency.py).
            "endpoint_concurrency": 100,
            "lease": 30.0,
            "poll_interval": 0.05,
            "schedule": SCHEDULE,
            "disable_after": timedelta(days=5),
        }
        values.update(overrides)
        return WebhookDispatcher(
            self.db,
            self.sender,
            self.bus,
            self.clock,
            DispatchSettings(**values),
            DispatchMetrics(registry or CollectorRegistry()),
            random.Random(seed),  # noqa: S311 - jitter
        )

    async def user(self) -> str:
        now = self.clock.now()
        user = User(
            id=new_id("usr", now.timestamp()),
            email=f"{uuid.uuid4().hex}@example.com",
            display_name="Hook Owner",
            role=Role.USER,
            tier=Tier.FREE,
            state=UserState.ACTIVE,
            preferences=Preferences(),
            create_time=now,
            update_time=now,
        )
        async with self.db() as uow:
            await uow.users.add(user, None)
        return user.id

    async def endpoint(
        self, owner: str, path: str, event_types: Sequence[str] = (), *, rate_limit: int = 0
    ) -> Webhook:
        now = self.clock.now()
        webhook = Webhook(
            id=new_id("whk", now.timestamp()),
            user_id=owner,
            url=self.rx.url(path),
            description="",
            event_types=validate_filters(event_types, SUBSCRIBABLE),
            transform="",
            rate_limit=rate_limit,
            headers={"x-test": "dispatch"},
            disabled_reason=DisabledReason.NONE,
            secret=new_secret(),
            previous_secret=None,
            previous_secret_expire_time=None,
            failing_since=None,
            version=1,
            create_time=now,
            update_time=now,
        )
        async with self.db() as uow:
            await uow.webhooks.add(webhook)
        return webhook

    async def emit(self, owner: str, type_: str = "tunnel.created") -> Event:
        """Record an event (the outbox queues its deliveries in the same transaction)."""
        async with self.db() as uow:
            return await record(
                uow,
                self.bus,
                self.clock,
                type_,
                subject=f"users/{owner}/tunnels/t{uuid.uuid4().hex[:6]}",
                user_id=owner,
                actor=f"users/{owner}",
                payload={"n": len(self.heard)},
            )

    async def webhook(self, webhook_id: str) -> Webhook:
        async with self.db(readonly=True) as uow:
            found = await uow.webhooks.get(webhook_id)
        assert found is not None
        return found

    async def deliveries(self, webhook_id: str) -> list[Delivery]:
        """The endpoint's deliveries with their attempts, oldest first."""
        query = ListQuery(
            limit=10_000, order=(OrderKey("create_time"),), filter=None, after=None, fingerprint=""
        )
        async with self.db(readonly=True) as uow:
            return await uow.webhooks.deliveries(webhook_id, query)

    async def delivery(self, delivery_id: str) -> Delivery:
        async with self.db(readonly=True) as uow:
            found = await uow.webhooks.delivery(delivery_id)
        assert found is not None
        return found

    async def only_delivery(self, webhook_id: str, event: Event) -> Delivery:
        found = [d for d in await self.deliveries(webhook_id) if d.event_id == event.id]
        assert len(found) == 1, found
        return found[0]

    async def synced(self) -> None:
        """Wait until the receiver has logged every recorded attempt."""
        async with self.db.engine.connect() as conn:
            count = (
                await conn.execute(sa.select(sa.func.count()).select_from(webhook_attempts))
            ).scalar_one()
        await self.rx.wait_for(int(count), within=10)

    async def step(self, dispatcher: WebhookDispatcher) -> int:
        """One round, then the receiver's log caught up."""
        claimed = await dispatcher.run_once()
        await self.synced()
        return claimed

    async def drain(self, dispatcher: WebhookDispatcher, max_rounds: int = 300) -> int:
        """Rounds until nothing is pending: each time nothing is due, the clock jumps to the
        next due time. The number of rounds that claimed something."""
        busy = 0
        for _ in range(max_rounds):
            if await self.step(dispatcher):
                busy += 1
                continue
            async with self.db(readonly=True) as uow:
                due = await uow.webhooks.next_due()
            if due is None:
                return busy
            assert due > self.clock.now(), "a due delivery was not claimed"
            self.clock.reach(due)
        raise AssertionError(f"deliveries still pending after {max_rounds} rounds")


@asynccontextmanager
async def open_rig(backend: Backend, directory: Path) -> AsyncIterator[Rig]:
    """A :class:`Rig` on a database of its own in ``directory``."""
    clock = ManualClock()
    async with own_database(backend, directory) as own, Receiver() as rx:
        db = Database(own.database_url, clock=clock, pool_size=5)
        sender = WebhookSender()  # the production timeout: see the module docstring
        bus = MemoryBus()
        built = Rig(db, clock, bus, rx, sender)
        bus.listen(built.heard.append)
        try:
            yield built
        finally:
            await sender.close()
            await db.dispose()


@pytest.fixture
async def rig(backend: Backend, tmp_path: Path) -> AsyncIterator[Rig]:
    async with open_rig(backend, tmp_path) as opened:
        yield opened


def observed_status(seen: Seen) -> int:
    """The status the dispatcher got for a request the receiver logged (0: no answer)."""
    return seen.status


def check_signature(webhook: Webhook, seen: Seen) -> None:
    """Both verifiers accept the request: ours at its own timestamp, the independent
    ``standardwebhooks`` against the real time (the manual clock stays near it)."""
    stamp = datetime.fromtimestamp(int(seen.headers["webhook-timestamp"]), UTC)
    domain_verify(webhook.secret, seen.headers, seen.body, stamp)
    StandardWebhook(webhook.secret).verify(seen.body, seen.headers)
    assert seen.headers["x-test"] == "dispatch"
    assert seen.headers["content-type"] == "application/json"


# --- Property 13 ------------------------------------------------------------------------

TYPES = ("tunnel.created", "tunnel.deleted", "tunnel.health_changed", "user.tier_changed")
FILTER_ENTRIES = (
    "*",
    "tunnel.*",
    "tunnel.created",
    "tunnel.deleted",
    "user.*",
    "endpoint.*",
    "endpoint.disabled",
)
#: Per attempt: 2xx, 5xx, no answer, 410, 429 and 503 (with Retry-After).
BEHAVIOURS = ("ok", "error", "ok", "error", "no_answer", "gone", "slow_down", "unavailable")


@dataclass(frozen=True)
class EndpointSpec:
    owner: int
    filters: tuple[str, ...]
    behaviours: tuple[str, ...]
    retry_after_429: int
    retry_after_503: int

    def reply(self, behaviour: str) -> Reply:
        return {
            "ok": Reply(200),
            "error": Reply(500),
            "no_answer": Reply(NO_ANSWER, drop=True),
            "gone": Reply(410),
            "slow_down": Reply(429, retry_after=str(self.retry_after_429)),
            "unavailable": Reply(503, retry_after=str(self.retry_after_503)),
        }[behaviour]

    def retry_after(self, status: int) -> timedelta:
        seconds = {429: self.retry_after_429, 503: self.retry_after_503}.get(status, 0)
        return timedelta(seconds=seconds)


endpoint_specs = st.builds(
    EndpointSpec,
    owner=st.integers(0, 1),
    filters=st.lists(st.sampled_from(FILTER_ENTRIES), max_size=2, unique=True).map(tuple),
    behaviours=st.lists(st.sampled_from(BEHAVIOURS), max_size=8).map(tuple),
    retry_after_429=st.integers(1, 20),
    retry_after_503=st.integers(1, 20),
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    specs=st.lists(endpoint_specs, min_size=1, max_size=3),
    emitted=st.lists(st.tuples(st.integers(0, 1), st.sampled_from(TYPES)), min_size=1, max_size=4),
    interleave=st.booleans(),
    seed=st.integers(0, 2**32),
)
async def test_property_13_at_least_once_on_schedule_with_a_faithful_history(
    rig: Rig,
    specs: list[EndpointSpec],
    emitted: list[tuple[int, str]],
    interleave: bool,
    seed: int,
) -> None:
    """Plan Property 13: whatever each endpoint answers, every event reaches every endpoint
    of its owner whose filter matches (a 2xx received) unless the endpoint answered 410 or
    the schedule ran out; nothing reaches any other endpoint; retries keep the jittered
    schedule and Retry-After; the stored history is exactly what the receiver saw; every
    request is signed."""
    rig.clock.set(datetime.now(UTC))
    tag = uuid.uuid4().hex[:10]
    owners = [await rig.user(), await rig.user()]
    hooks: list[Webhook] = []
    for i, spec in enumerate(specs):
        path = f"/{tag}/{i}"
        rig.rx.script(path, *(spec.reply(b) for b in spec.behaviours))
        hooks.append(await rig.endpoint(owners[spec.owner], path, spec.filters))
    first_heard = len(rig.heard)
    dispatcher = rig.dispatcher(seed)
    for owner, type_ in emitted:
        await rig.emit(owners[owner], type_)
        if interleave:
            await rig.drain(dispatcher)
            rig.clock.advance(SECOND)
    await rig.drain(dispatcher)

    events = [e for e in rig.heard[first_heard:] if e.user_id in owners]
    assert len(events) >= len(emitted)
    for i, (hook, spec) in enumerate(zip(hooks, specs, strict=True)):
        final = await rig.webhook(hook.id)
        seen_here = rig.rx.at(f"/{tag}/{i}")
        deliveries = {d.event_id: d for d in await rig.deliveries(hook.id)}
        gone = [s for s in seen_here if s.status == 410]
        # Disabled on (and only on) a 410; never for failing (disable_after is 5 days).
        expected_reason = DisabledReason.GONE if gone else DisabledReason.NONE
        assert final.disabled_reason is expected_reason
        accounted = 0
        for event in events:
            receives = event.user_id == hook.user_id and matches(hook.event_types, event.type)
            mine = [s for s in seen_here if s.message_id == event.id]
            if not receives:
                assert event.id not in deliveries
                assert not mine  # (b)
                continue
            delivery = deliveries[event.id]
            accounted += len(mine)
            _check_delivery(delivery, mine, spec, final)
            for s in mine:  # (e)
                check_signature(final, s)
                body = json.loads(s.body)
                assert body["type"] == event.type
                assert body["data"]["subject"] == event.subject
        # Every request to this endpoint belongs to one of its deliveries.
        assert accounted == len(seen_here)
        assert len(deliveries) == sum(
            e.user_id == hook.user_id and matches(hook.event_types, e.type) for e in events
        )
        for s in seen_here:
            count_case(f"answered {observed_status(s)}")
        if gone:
            count_case("endpoint disabled (410)")
            # Nothing was sent after the round that got the 410.
            last = max(a.time for d in deliveries.values() for a in d.attempts)
            gone_at = min(
                a.time for d in deliveries.values() for a in d.attempts if a.status_code == 410
            )
            assert last == gone_at


def _check_delivery(
    delivery: Delivery, seen: list[Seen], spec: EndpointSpec, final: Webhook
) -> None:
    attempts = delivery.attempts
    # (d) The history is what the receiver saw, attempt by attempt.
    assert [a.number for a in attempts] == list(range(1, len(attempts) + 1))
    assert delivery.attempt_count == len(attempts)
    assert [a.status_code for a in attempts] == [observed_status(s) for s in seen]
    assert [a.succeeded for a in attempts] == [200 <= observed_status(s) < 300 for s in seen]
    assert [s.headers["webhook-timestamp"] for s in seen] == [
        str(int(a.time.timestamp())) for a in attempts
    ]
    assert [a.error for a in attempts] == [
        NO_ANSWER_ERROR if s.status == NO_ANSWER else "" for s in seen
    ]
    # (a) Delivered, unless disabled (410) or out of retries.
    assert delivery.state is not DeliveryState.PENDING
    assert delivery.next_attempt_time is None
    if delivery.state is DeliveryState.SUCCEEDED:
        assert attempts
        assert attempts[-1].succeeded
        assert not any(a.succeeded for a in attempts[:-1])
    else:
        assert not any(a.succeeded for a in attempts)
        exhausted = len(attempts) == len(SCHEDULE) + 1
        count_case("delivery exhausted" if exhausted else "delivery failed with its endpoint")
        assert final.disabled_reason is DisabledReason.GONE or exhausted, attempts
    assert len(attempts) <= len(SCHEDULE) + 1
    # (c) Each retry waits its jittered delay, and at least what Retry-After asked: the
    # clock jumps straight to each due time, so a retry is never late either.
    for before, after, answer in zip(attempts, attempts[1:], seen, strict=False):
        gap = after.time - before.time
        scheduled = SCHEDULE[before.number - 1]
        asked = (
            spec.retry_after(answer.status)
            if answer.status in RETRY_AFTER_STATUSES
            else timedelta(0)
        )
        assert gap >= scheduled * 0.8
        assert gap >= asked
        assert gap <= max(scheduled * 1.2, asked)


# --- disabling and the failure record ---------------------------------------------------


async def test_a_410_disables_the_endpoint_at_once(rig: Rig) -> None:
    owner, stranger = await rig.user(), await rig.user()
    gone = await rig.endpoint(owner, "/gone", ["tunnel.*"])
    sibling = await rig.endpoint(owner, "/sibling", ["endpoint.*"])
    elsewhere = await rig.endpoint(stranger, "/elsewhere", ["endpoint.*"])
    rig.rx.script("/gone", 500, 410)
    dispatcher = rig.dispatcher()

    first = await rig.emit(owner)
    assert await rig.step(dispatcher) == 1
    waiting = await rig.only_delivery(gone.id, first)
    assert waiting.state is DeliveryState.PENDING
    assert waiting.next_attempt_time is not None
    assert waiting.next_attempt_time > rig.clock.now()

    second = await rig.emit(owner, "tunnel.deleted")
    assert await rig.step(dispatcher) == 1  # only the new one is due
    disabled = await rig.webhook(gone.id)
    assert disabled.disabled_reason is DisabledReason.GONE
    assert disabled.version == gone.version + 1
    answered = await rig.only_delivery(gone.id, second)
    assert answered.state is DeliveryState.FAILED
    assert [a.status_code for a in answered.attempts] == [410]
    # The delivery waiting for its retry failed with the endpoint, without another try.
    dropped = await rig.delivery(waiting.id)
    assert dropped.state is DeliveryState.FAILED
    assert dropped.next_attempt_time is None
    assert [a.status_code for a in dropped.attempts] == [500]

    notices = [e for e in rig.heard if e.type == DISABLED_EVENT]
    assert len(notices) == 1
    notice = notices[0]
    assert notice.user_id == owner
    assert notice.subject == gone.name
    assert notice.payload == {"name": gone.name, "url": gone.url, "reason": "gone"}
    # The notice is queued for the owner's other endpoints (not for the disabled one).
    own_copy = [d for d in await rig.deliveries(gone.id) if d.event_id == notice.id]
    assert own_copy == []  # its filter (tunnel.*) does not take endpoint.disabled

    await rig.drain(dispatcher)
    told = rig.rx.at("/sibling")
    assert [s.message_id for s in told] == [notice.id]
    assert told[0].json["type"] == DISABLED_EVENT
    assert told[0].json["data"]["object"]["reason"] == "gone"
    check_signature(sibling, told[0])
    assert (await rig.only_delivery(sibling.id, notice)).state is DeliveryState.SUCCEEDED
    assert rig.rx.at("/elsewhere") == []
    assert await rig.deliveries(elsewhere.id) == []
    assert len(rig.rx.at("/gone")) == 2

    # A later event is kept for recovery, not sent.
    third = await rig.emit(owner)
    kept = await rig.only_delivery(gone.id, third)
    assert kept.state is DeliveryState.FAILED
    assert kept.attempts == ()
    await rig.drain(dispatcher)
    assert len(rig.rx.at("/gone")) == 2


async def test_an_endpoint_disabled_by_410_gets_its_own_notice_as_failed(rig: Rig) -> None:
    owner = await rig.user()
    everything = await rig.endpoint(owner, "/all")  # no filter: every event
    rig.rx.script("/all", 410)
    event = await rig.emit(owner)
    await rig.drain(rig.dispatcher())
    notice = next(e for e in rig.heard if e.type == DISABLED_EVENT)
    copy = await rig.only_delivery(everything.id, notice)
    assert copy.state is DeliveryState.FAILED
    assert copy.attempts == ()
    assert [s.message_id for s in rig.rx.at("/all")] == [event.id]


async def test_failing_beyond_disable_after_disables_with_failing(rig: Rig) -> None:
    owner = await rig.user()
    watcher = await rig.endpoint(owner, "/watcher", ["endpoint.disabled"])
    failing = await rig.endpoint(owner, "/failing", ["tunnel.*"])
    rig.rx.script("/failing", *[500] * 20)
    limit = timedelta(seconds=30)
    dispatcher = rig.dispatcher(schedule=(timedelta(seconds=10),) * 8, disable_after=limit)
    started = rig.clock.now()
    event = await rig.emit(owner)
    other = await rig.emit(owner, "tunnel.deleted")
    assert await rig.step(dispatcher) == 2
    assert (await rig.webhook(failing.id)).failing_since == started

    while True:
        async with rig.db(readonly=True) as uow:
            due = await uow.webhooks.next_due()
        assert due is not None
        rig.clock.reach(due)
        assert await rig.step(dispatcher) >= 1
        hook = await rig.webhook(failing.id)
        if rig.clock.now() - started < limit:
            assert hook.disabled_reason is DisabledReason.NONE
            assert hook.failing_since == started  # not restarted by later failures
            continue
        assert hook.disabled_reason is DisabledReason.FAILING
        break

    for dropped in (event, other):
        delivery = await rig.only_delivery(failing.id, dropped)
        assert delivery.state is DeliveryState.FAILED
        assert delivery.next_attempt_time is None
        assert all(not a.succeeded for a in delivery.attempts)
    notice = next(e for e in rig.heard if e.type == DISABLED_EVENT)
    assert notice.payload["reason"] == "failing"
    sent = len(rig.rx.at("/failing"))
    await rig.drain(dispatcher)
    assert len(rig.rx.at("/failing")) == sent
    assert [s.message_id for s in rig.rx.at("/watcher")] == [notice.id]
    assert (await rig.webhook(watcher.id)).disabled_reason is DisabledReason.NONE


async def test_a_success_clears_the_failure_record(rig: Rig) -> None:
    owner = await rig.user()
    hook = await rig.endpoint(owner, "/flaky")
    rig.rx.script("/flaky", 500, Reply(503), 200, 500)
    dispatcher = rig.dispatcher()
    started = rig.clock.now()
    event = await rig.emit(owner)
    await rig.step(dispatcher)
    assert (await rig.webhook(hook.id)).failing_since == started
    for _ in range(2):
        rig.clock.reach((await rig.only_delivery(hook.id, event)).next_attempt_time or started)
        await rig.step(dispatcher)
    delivery = await rig.only_delivery(hook.id, event)
    assert delivery.state is DeliveryState.SUCCEEDED
    assert [a.status_code for a in delivery.attempts] == [500, 503, 200]
    assert (await rig.webhook(hook.id)).failing_since is None

    # The next failure starts a new record, at its own time.
    rig.clock.advance(timedelta(minutes=1))
    again = rig.clock.now()
    await rig.emit(owner)
    await rig.step(dispatcher)
    assert (await rig.webhook(hook.id)).failing_since == again


async def test_an_exhausted_schedule_fails_the_delivery(rig: Rig) -> None:
    owner = await rig.user()
    hook = await rig.endpoint(owner, "/down")
    rig.rx.script("/down", *[500] * 10)
    schedule = (timedelta(seconds=1), timedelta(seconds=2))
    started = rig.clock.now()
    event = await rig.emit(owner)
    await rig.drain(rig.dispatcher(schedule=schedule))
    delivery = await rig.only_delivery(hook.id, event)
    assert delivery.state is DeliveryState.FAILED
    assert delivery.next_attempt_time is None
    assert [a.status_code for a in delivery.attempts] == [500, 500, 500]
    assert [s.message_id for s in rig.rx.at("/down")] == [event.id] * 3
    after = await rig.webhook(hook.id)
    assert after.disabled_reason is DisabledReason.NONE  # five days have not passed
    assert after.failing_since == started


async def test_retry_after_is_honoured_on_429_and_503_only(rig: Rig) -> None:
    owner = await rig.user()
    # Whole seconds, so that an HTTP-date (second precision) is exact.
    rig.clock.set(rig.clock.now().replace(microsecond=0))
    t0 = rig.clock.now()
    answers = {
        "/seconds": Reply(429, retry_after="120"),
        "/date": Reply(503, retry_after=format_datetime(t0 + timedelta(seconds=90), usegmt=True)),
        "/capped": Reply(429, retry_after="999999"),
        "/ignored": Reply(500, retry_after="120"),
        "/garbled": Reply(503, retry_after="soon"),
    }
    hooks = {}
    for path, reply in answers.items():
        rig.rx.script(path, reply)
        hooks[path] = await rig.endpoint(owner, path)
    event = await rig.emit(owner)
    dispatcher = rig.dispatcher(schedule=(timedelta(seconds=10),) * 3)
    assert await rig.step(dispatcher) == len(answers)

    async def due(path: str) -> datetime:
        delivery = await rig.only_delivery(hooks[path].id, event)
        assert delivery.state is DeliveryState.PENDING
        assert delivery.next_attempt_time is not None
        return delivery.next_attempt_time

    assert await due("/seconds") == t0 + timedelta(seconds=120)
    assert await due("/date") == t0 + timedelta(seconds=90)
    assert await due("/capped") == t0 + timedelta(hours=24)
    for path in ("/ignored", "/garbled"):
        assert t0 + timedelta(seconds=8) <= await due(path) <= t0 + timedelta(seconds=12)

    # Not a moment sooner: one microsecond before, /seconds is not due.
    rig.clock.set(await due("/seconds") - timedelta(microseconds=1))
    assert await rig.step(dispatcher) == 3  # all but /seconds and /capped
    assert [s.message_id for s in rig.rx.at("/seconds")] == [event.id]
    rig.clock.advance(timedelta(microseconds=1))
    assert await rig.step(dispatcher) == 1
    assert len(rig.rx.at("/seconds")) == 2
    await rig.drain(dispatcher)
    for path, hook in hooks.items():
        delivery = await rig.only_delivery(hook.id, event)
        assert delivery.state is DeliveryState.SUCCEEDED, path
        assert len(delivery.attempts) == 2


# --- leases and claims ------------------------------------------------------------------


async def test_a_claim_whose_dispatcher_died_comes_due_after_the_lease(rig: Rig) -> None:
    owner = await rig.user()
    hook = await rig.endpoint(owner, "/crash")
    event = await rig.emit(owner)
    lease = 30.0
    now = rig.clock.now()
    async with rig.db() as uow:
        claimed = await uow.webhooks.claim(now, now + timedelta(seconds=lease), 10, 4242)
    assert [(c.webhook_id, c.event_id, c.attempt_count) for c in claimed] == [
        (hook.id, event.id, 0)
    ]
    # The doomed dispatcher gets its request out, then dies before recording anything.
    request = render(await rig.webhook(hook.id), event, now)
    result = await rig.sender.send(request.url, request.body, request.headers)
    assert result.status == 200

    dispatcher = rig.dispatcher(lease=lease)
    assert await rig.step(dispatcher) == 0
    rig.clock.advance(timedelta(seconds=lease) - timedelta(milliseconds=1))
    assert await rig.step(dispatcher) == 0  # the lease still holds it
    rig.clock.advance(timedelta(milliseconds=1))
    assert await rig.step(dispatcher) == 1

    seen = rig.rx.at("/crash")
    assert [s.message_id for s in seen] == [event.id, event.id]  # the same webhook-id
    assert seen[0].body == seen[1].body
    for s in seen:
        check_signature(hook, s)
    delivery = await rig.only_delivery(hook.id, event)
    assert delivery.state is DeliveryState.SUCCEEDED
    assert [(a.number, a.status_code) for a in delivery.attempts] == [(1, 200)]
    assert delivery.attempts[0].time == rig.clock.now()

    # The dead claim's token can no longer record, release or add an attempt.
    stale = Attempt(1, now, 500, 0.1, "", "", succeeded=False)
    async with rig.db() as uow:
        assert not await uow.webhooks.finish(
            [Finished(delivery.id, 4242, DeliveryState.PENDING, now, stale)], now
        )
        await uow.webhooks.release(delivery.id, 4242, now)
    assert await rig.delivery(delivery.id) == delivery


async def test_a_stale_claim_cannot_record_over_the_new_one(rig: Rig) -> None:
    owner = await rig.user()
    hook = await rig.endpoint(owner, "/stale")
    event = await rig.emit(owner)
    now = rig.clock.now()
    lease = timedelta(seconds=5)
    async with rig.db() as uow:
        (old,) = await uow.webhooks.claim(now, now + lease, 10, 1111)
    rig.clock.advance(lease)
    later = rig.clock.now()
    async with rig.db() as uow:
        (new,) = await uow.webhooks.claim(later, later + lease, 10, 2222)
    assert new.delivery_id == old.delivery_id
    failed = Attempt(1, now, 500, 0.1, "", "", succeeded=False)
    ok = Attempt(1, later, 200, 0.1, "ok", "", succeeded=True)
    async with rig.db() as uow:
        assert not await uow.webhooks.finish(
            [Finished(old.delivery_id, old.token, DeliveryState.FAILED, None, failed)], now
        )
    async with rig.db() as uow:
        assert await uow.webhooks.finish(
            [Finished(new.delivery_id, new.token, DeliveryState.SUCCEEDED, None, ok)], later
        )
    async with rig.db() as uow:  # once recorded, neither token holds it
        for token in (old.token, new.token):
            assert not await uow.webhooks.finish(
                [Finished(new.delivery_id, token, DeliveryState.FAILED, None, None)], later
            )
    delivery = await rig.only_delivery(hook.id, event)
    assert delivery.state is DeliveryState.SUCCEEDED
    assert [(a.number, a.status_code) for a in delivery.attempts] == [(1, 200)]
    assert rig.rx.seen == []


# --- an endpoint that does not open ----------------------------------------------------


async def test_an_endpoint_that_does_not_open_holds_up_only_its_own_deliveries(rig: Rig) -> None:
    """A row sealed under a key this server lacks (a wrong ``TP_SECRETS_KEY``) fails no round:
    the other endpoints' deliveries go out; its own wait for their leases, counted, and its
    backlog is not claimed meanwhile. Nothing is lost: with a key that opens it, they go out."""
    owner = await rig.user()
    good = await rig.endpoint(owner, "/good")
    poison = await rig.endpoint(owner, "/poison")
    foreign = Sealer([os.urandom(32)])
    await set_secret(rig, poison.id, foreign.seal(poison.secret, poison.id))
    for _ in range(3):
        await rig.emit(owner)
    registry = CollectorRegistry()
    lease = timedelta(seconds=30)
    dispatcher = rig.dispatcher(
        registry=registry, endpoint_concurrency=2, lease=lease.total_seconds()
    )

    def unreadable() -> float:
        value = registry.get_sample_value(
            "tunnelplane_webhook_deliveries_total", {"result": "unreadable"}
        )
        return value or 0.0

    assert await rig.step(dispatcher) == 4  # two of each endpoint's three
    assert len(rig.rx.at("/good")) == 2
    assert unreadable() == 2
    assert await rig.step(dispatcher) == 1  # the good one's third; the other is set aside
    assert len(rig.rx.at("/good")) == 3
    assert unreadable() == 2
    assert all(d.state is DeliveryState.SUCCEEDED for d in await rig.deliveries(good.id))
    waiting = await rig.deliveries(poison.id)
    assert [(d.state, d.attempts) for d in waiting] == [(DeliveryState.PENDING, ())] * 3

    rig.clock.advance(lease)
    assert await rig.step(dispatcher) == 2  # the leases ended: tried again, set aside again
    assert unreadable() == 4
    assert rig.rx.at("/poison") == []

    await set_secret(rig, poison.id, rig.db.sealer.seal(poison.secret, poison.id))
    rig.clock.advance(lease)
    await rig.drain(dispatcher)
    assert len(rig.rx.at("/poison")) == 3
    for seen in rig.rx.at("/poison"):
        check_signature(poison, seen)
    assert all(d.state is DeliveryState.SUCCEEDED for d in await rig.deliveries(poison.id))
    assert unreadable() == 4


async def set_secret(rig: Rig, webhook_id: str, sealed: str) -> None:
    """Write an endpoint's stored (sealed) secret as it is given."""
    async with rig.db.engine.begin() as conn:
        await conn.execute(
            sa.update(webhooks_table).where(webhooks_table.c.id == webhook_id).values(secret=sealed)
        )


# --- the per-endpoint rate limit --------------------------------------------------------


async def test_the_rate_limit_gives_held_back_deliveries_slots_one_interval_apart(
    rig: Rig,
) -> None:
    owner = await rig.user()
    limited = await rig.endpoint(owner, "/limited", rate_limit=2)
    free = await rig.endpoint(owner, "/free")
    t0 = rig.clock.now()
    events = [await rig.emit(owner) for _ in range(5)]
    dispatcher = rig.dispatcher()
    assert await rig.step(dispatcher) == 10
    assert len(rig.rx.at("/limited")) == 1
    assert len(rig.rx.at("/free")) == 5  # no limit: all at once
    assert all(d.state is DeliveryState.SUCCEEDED for d in await rig.deliveries(free.id)), (
        "unlimited deliveries are not held back"
    )
    held = [d for d in await rig.deliveries(limited.id) if d.state is DeliveryState.PENDING]
    assert len(held) == 4
    assert all(d.attempts == () and d.attempt_count == 0 for d in held)
    assert sorted(d.next_attempt_time for d in held if d.next_attempt_time) == [
        t0 + timedelta(seconds=0.5) * i for i in range(1, 5)
    ]
    assert {d.event_id for d in held} < {e.id for e in events}


async def test_held_back_deliveries_are_sent_at_their_slots(rig: Rig) -> None:
    """A held-back delivery is sent when its turn comes; it does not take a new slot
    behind the others each time it comes due (which would hold a burst back forever)."""
    owner = await rig.user()
    limited = await rig.endpoint(owner, "/limited", rate_limit=2)
    t0 = rig.clock.now()
    for _ in range(5):
        await rig.emit(owner)
    await rig.drain(rig.dispatcher(), max_rounds=40)
    deliveries = await rig.deliveries(limited.id)
    assert all(d.state is DeliveryState.SUCCEEDED for d in deliveries)
    assert all(len(d.attempts) == 1 for d in deliveries)
    times = sorted(d.attempts[0].time for d in deliveries)
    assert times == [t0 + timedelta(seconds=0.5) * i for i in range(5)]
    assert len(rig.rx.at("/limited")) == 5

    # Later events meet the limit where the burst left it: the next slot is t0 + 2.5 s.
    rig.clock.set(t0 + timedelta(seconds=2.2))
    await rig.emit(owner)
    await rig.drain(rig.dispatcher())
    latest = max(a.time for d in await rig.deliveries(limited.id) for a in d.attempts)
    assert latest == t0 + timedelta(seconds=2.5)
