"""The webhook dispatcher in real server processes on PostgreSQL: a process killed with
SIGKILL mid-delivery loses nothing (its claims come due again after the lease and are sent
again with the same ``webhook-id``), and two processes share one queue without sending any
delivery twice."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc
import httpx
import pytest
import sqlalchemy as sa
from aiohttp import web
from tunnelplane.v1 import events_pb2, webhooks_pb2

from server.domain.common.ids import new_id
from server.domain.identity.tokens import generate_private_key_pem
from server.storage.database import make_engine
from server.storage.tables import events, webhook_attempts, webhook_deliveries
from tests.conftest import (
    REDIS_URL,
    create_postgres_database,
    drop_postgres_database,
    migrate,
    require_postgres,
    require_redis,
)
from tests.helpers import Client, eventually
from tests.processes import ServerProcess, child_env, replica_envs, serving
from tests.webhook_receiver import Receiver

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from server.app import App

pytestmark = pytest.mark.slow
D = webhooks_pb2.WebhookDelivery
EXEMPT = "127.0.0.0/8,::1"  # the test's own calls are never rate limited
SUCCEEDED = re.compile(r'^tunnelplane_webhook_deliveries_total\{result="succeeded"\} (\S+)$', re.M)


# --- a receiver that also sees requests as they arrive ------------------------------------


@dataclass(frozen=True)
class Arrival:
    """A request as it arrived, before it was answered."""

    message_id: str
    #: 1 before the dispatcher was killed, 2 after.
    phase: int


@dataclass
class Recorder(Receiver):
    """A :class:`Receiver` that logs each request on arrival, can hold every answer until
    :meth:`release`, and answers after ``delay``."""

    delay: float = 0.0
    phase: int = 1
    arrivals: list[Arrival] = field(default_factory=list)
    _gate: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._gate.set()

    async def __aenter__(self) -> Recorder:
        await self.start()
        return self

    def hold(self) -> None:
        """Answer nothing until :meth:`release` (every request stays in flight)."""
        self._gate.clear()

    def release(self) -> None:
        """Answer the held requests (and every later one) as scripted."""
        self._gate.set()

    def ids(self, phase: int) -> set[str]:
        """The ``webhook-id`` of the requests that arrived in ``phase``."""
        return {a.message_id for a in self.arrivals if a.phase == phase}

    async def arrived_until(self, done: Callable[[], bool], within: float) -> None:
        """Wait until ``done()``, checked whenever a request arrives or is answered."""
        assert self._changed is not None
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(done)

    async def _handle(self, request: web.Request) -> web.Response:
        self.arrivals.append(Arrival(request.headers.get("webhook-id", ""), self.phase))
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()
        await self._gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        return await super()._handle(request)


# --- helpers ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def fresh_database() -> AsyncIterator[str]:
    """A migrated database of this test's own: no other server's dispatcher claims its rows."""
    url = create_postgres_database()
    try:
        await migrate(url)
        yield url
    finally:
        drop_postgres_database(url)


@contextlib.asynccontextmanager
async def engine_of(url: str) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(url, pool_size=1, statement_timeout=60)
    try:
        yield engine
    finally:
        await engine.dispose()


@contextlib.asynccontextmanager
async def client_of(server: ServerProcess) -> AsyncIterator[Client]:
    """Stubs for a child server, reading its log meanwhile (so that its stderr pipe never
    fills up; the lines are kept in ``server.log`` for a failing test's report)."""

    async def keep_reading() -> None:
        with contextlib.suppress(Exception):
            await server.drain_log()

    reader = asyncio.create_task(keep_reading())
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            # Only the plain helpers (register, log in, create) are used: no App needed.
            yield Client(cast("App", None), channel)
    finally:
        if server.process.returncode is None:
            server.process.kill()
        await server.process.wait()
        await reader


async def count(engine: AsyncEngine, stmt: Any) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(stmt)).scalar_one())


def deliveries_in(state: str) -> Any:
    d = webhook_deliveries.c
    return sa.select(sa.func.count()).select_from(webhook_deliveries).where(d.state == state)


async def succeeded_total(metrics_port: int) -> float:
    """The process's ``tunnelplane_webhook_deliveries_total{result="succeeded"}``."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)).text
    match = SUCCEEDED.search(text)
    return float(match.group(1)) if match else 0.0


async def all_deliveries(client: Client, hook: webhooks_pb2.Webhook, metadata: Any) -> list[Any]:
    response = await client.webhooks.ListWebhookDeliveries(
        webhooks_pb2.ListWebhookDeliveriesRequest(parent=hook.name, page_size=1000),
        metadata=metadata,
    )
    assert not response.next_page_token
    return list(response.deliveries)


# --- crash safety -------------------------------------------------------------------------

TUNNELS = 12
LEASE = 3.0


async def test_a_killed_dispatcher_loses_no_delivery(tmp_path: Path) -> None:
    require_postgres()
    key = tmp_path / "jwt.pem"
    key.write_bytes(generate_private_key_pem())
    (tmp_path / "data").mkdir()
    async with fresh_database() as url, engine_of(url) as engine, Recorder() as rx:
        env = child_env(
            tmp_path / "data",
            TP_DATABASE_URL=url,
            # The restarted process must accept the tokens the killed one issued.
            TP_JWT_PRIVATE_KEY_FILE=str(key),
            TP_PAGE_TOKEN_SECRET="p" * 40,
            TP_RATE_EXEMPT_IPS=EXEMPT,
            TP_TIER_FREE_MAX_TUNNELS=str(TUNNELS),
            TP_WEBHOOK_CLAIM_LEASE=str(LEASE),
            TP_WEBHOOK_TIMEOUT="2",
            # Attempts that time out while the receiver holds them must not use up the
            # retries before the kill.
            TP_WEBHOOK_RETRY_SCHEDULE=",".join(["0.5"] * 10),
            # The held attempts time out: the endpoint's breaker would put the rest off
            # for its open time (tests/integration/test_webhook_breaker.py covers that).
            TP_BREAKER_THRESHOLD="1000",
        )
        rx.hold()
        try:
            async with serving(env) as first, client_of(first) as client:
                user = await client.new_user()
                hook = await client.webhook(user, rx.url(), event_types=["tunnel.created"])
                tunnels = [await client.tunnel(user) for _ in range(TUNNELS)]
                # Every event's delivery has been sent at least once and none answered: each
                # is in flight (claimed, nothing recorded) or waiting for a retry.
                await rx.arrived_until(lambda: len(rx.ids(1)) == TUNNELS, within=30)
                first.process.kill()
                await first.process.wait()
            rx.phase = 2
            assert await count(engine, deliveries_in("pending")) == TUNNELS
            d = webhook_deliveries.c
            in_flight = sa.select(sa.func.count()).where(d.claim != 0)
            assert await count(engine, in_flight.select_from(webhook_deliveries)) >= 1
        finally:
            rx.release()  # the killed process's held requests are answered to no one

        async with serving(env) as second, client_of(second) as client:
            await rx.arrived_until(lambda: len(rx.ids(2)) == TUNNELS, within=30)

            async def settled() -> bool:
                found = await all_deliveries(client, hook, user.metadata)
                return len(found) == TUNNELS and all(x.state == D.STATE_SUCCEEDED for x in found)

            await eventually(settled, within=15, every=0.1)
            deliveries = await all_deliveries(client, hook, user.metadata)
            listed = await client.events.ListEvents(
                events_pb2.ListEventsRequest(
                    parent="users/me", page_size=1000, filter='type = "tunnel.created"'
                ),
                metadata=user.metadata,
            )

        event_ids = {e.id for e in listed.events}
        assert len(event_ids) == TUNNELS
        # Everything sent before the kill was sent again after it, with the same webhook-id.
        assert rx.ids(1) == rx.ids(2) == event_ids
        assert {x.message_id for x in deliveries} == event_ids
        assert all(x.attempts and x.attempts[-1].succeeded for x in deliveries)
        # Each webhook-id is one event: every copy has the same body, of its own tunnel.
        bodies: dict[str, set[bytes]] = {}
        for seen in rx.seen:
            bodies.setdefault(seen.message_id, set()).add(seen.body)
        assert set(bodies) == event_ids
        assert all(len(b) == 1 for b in bodies.values()), "a webhook-id with two bodies"
        payloads = [json.loads(next(iter(b))) for b in bodies.values()]
        assert all(p["type"] == "tunnel.created" for p in payloads)
        assert sorted(p["data"]["subject"] for p in payloads) == sorted(t.name for t in tunnels)


# --- two dispatchers, one queue -----------------------------------------------------------

QUEUED = 300


async def queue_directly(engine: AsyncEngine, user_id: str, webhook_id: str, n: int) -> set[str]:
    """``n`` events, each with a delivery to ``webhook_id`` due now, in one transaction (what
    the outbox writes, without ``n`` API calls); their ids."""
    now = datetime.now(UTC)
    ids = [new_id("evt", now.timestamp()) for _ in range(n)]
    event_rows = [
        {
            "id": event_id,
            "type": "tunnel.updated",
            "subject": f"users/{user_id}/tunnels/{new_id('tun')}",
            "user_id": user_id,
            "actor": "",
            "time": now,
            "payload": {},
        }
        for event_id in ids
    ]
    delivery_rows = [
        {
            "id": new_id("dlv", now.timestamp()),
            "webhook_id": webhook_id,
            "event_id": event_id,
            "event_type": "tunnel.updated",
            "state": "pending",
            "attempt_count": 0,
            "next_attempt_time": now,
            "claim": 0,
            "test": False,
            "create_time": now,
            "update_time": now,
        }
        for event_id in ids
    ]
    async with engine.begin() as conn:
        await conn.execute(events.insert(), event_rows)
        await conn.execute(webhook_deliveries.insert(), delivery_rows)
    return set(ids)


async def test_two_dispatchers_share_the_queue_without_duplicates(tmp_path: Path) -> None:
    require_postgres()
    require_redis()
    async with fresh_database() as url, engine_of(url) as engine, Recorder(delay=0.05) as rx:
        env_a, env_b = replica_envs(url, REDIS_URL, tmp_path)
        for env in (env_a, env_b):
            # Small claims, so that both processes get work; a lease longer than the test,
            # so that a delivery sent twice can only be a claim taken twice.
            env.update(
                TP_WEBHOOK_BATCH="5",
                TP_WEBHOOK_CLAIM_LEASE="300",
                TP_WEBHOOK_TIMEOUT="30",
                TP_RATE_EXEMPT_IPS=EXEMPT,
            )
        async with (
            serving(env_a) as a,
            serving(env_b) as b,
            client_of(a) as client,
            client_of(b),
        ):
            user = await client.new_user()
            hook = await client.webhook(user, rx.url(), event_types=["tunnel.*"])
            webhook_id = hook.name.rsplit("/", 1)[1]
            queued = await queue_directly(engine, user.id, webhook_id, QUEUED)

            await rx.wait_for(QUEUED, within=45)
            await eventually(
                lambda: _equals(count(engine, deliveries_in("succeeded")), QUEUED),
                within=15,
                every=0.1,
            )
            by_a = await succeeded_total(a.metrics_port)
            by_b = await succeeded_total(b.metrics_port)

        received = [s.message_id for s in rx.seen]
        assert len(received) == QUEUED, f"{len(received) - len(set(received))} sent twice"
        assert set(received) == queued
        assert all(s.status == 200 for s in rx.seen)
        # One attempt each, and both processes did part of the work.
        assert await count(engine, sa.select(sa.func.count()).select_from(webhook_attempts)) == (
            QUEUED
        )
        d = webhook_deliveries.c
        assert await count(engine, sa.select(sa.func.max(d.attempt_count))) == 1
        assert by_a + by_b == QUEUED
        assert by_a > 0, (by_a, by_b)
        assert by_b > 0, (by_a, by_b)


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected
