"""Property 12, transaction consistency, on both databases, with failures injected into
the real driver path (a statement of the caller's own transaction fails as a dropped
connection would: ``OperationalError``, only for that caller's statements):

- a use case that fails part-way leaves none of its rows: creating a tunnel writes the
  tunnel, its event (the outbox), the webhook deliveries it fans out to and its audit
  entry, all or nothing;
- optimistic concurrency never loses an update: writers that each read the tunnel, append
  their mark to its description and write it back with the etag they read, retrying on
  ``ABORTED`` (someone wrote first) and ``UNAVAILABLE`` (an injected failure), end with
  every mark there exactly once.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event
from tunnelplane.v1 import tunnels_pb2

from server.app import App
from server.consistency import reader_var
from server.domain.identity.model import Tier
from server.storage.tables import audit_log, events, tunnels, webhook_deliveries
from tests.conftest import Backend, own_server
from tests.helpers import Client, TestUser, client_of
from tests.webhook_receiver import Receiver

P = tunnels_pb2
WRITE = re.compile(r"^\s*(INSERT|UPDATE|DELETE)\b", re.IGNORECASE)


class Injector:
    """Fails chosen write statements of one user's calls (counted from when it is armed)."""

    def __init__(self, app: App, user_id: str) -> None:
        self._user_id = user_id
        self._fail: set[int] = set()
        self._seen = 0
        self.failed = 0
        event.listen(app.db.engine.sync_engine, "before_cursor_execute", self._before)

    def _before(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if reader_var.get() != self._user_id or not WRITE.match(statement):
            return
        self._seen += 1
        if self._seen in self._fail:
            self.failed += 1
            raise sa.exc.OperationalError(statement[:40], None, ConnectionError("injected"))

    @contextmanager
    def armed(self, fail: set[int]) -> Iterator[None]:
        self._fail, self._seen, self.failed = set(fail), 0, 0
        try:
            yield
        finally:
            self._fail = set()


@pytest.fixture(scope="module")
async def world(
    backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[App, Client, TestUser, Injector]]:
    directory = tmp_path_factory.mktemp("consistency")
    async with (
        Receiver() as rx,
        own_server(backend, directory, rate_limit_enabled=False, webhook_dispatch=False) as app,
        client_of(app) as client,
    ):
        owner = await client.new_user(tier=Tier.ENTERPRISE)  # no cap on tunnels
        await client.webhook(owner, rx.url(), event_types=["tunnel.created"])
        yield app, client, owner, Injector(app, owner.id)


async def counts(app: App, owner: TestUser) -> tuple[int, int, int, int]:
    mine = owner.id
    async with app.db.engine.connect() as conn:
        return (
            await conn.scalar(sa.select(sa.func.count()).where(tunnels.c.user_id == mine)),
            await conn.scalar(sa.select(sa.func.count()).where(events.c.user_id == mine)),
            await conn.scalar(
                sa.select(sa.func.count())
                .select_from(webhook_deliveries)
                .where(
                    webhook_deliveries.c.event_id.in_(
                        sa.select(events.c.id).where(events.c.user_id == mine)
                    )
                )
            ),
            await conn.scalar(
                sa.select(sa.func.count()).where(
                    audit_log.c.actor_user_id == mine, audit_log.c.outcome == "OK"
                )
            ),
        )  # type: ignore[return-value]


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(fail_at=st.integers(1, 10))
async def test_a_use_case_that_fails_part_way_leaves_none_of_its_rows(
    world: tuple[App, Client, TestUser, Injector], fail_at: int
) -> None:
    app, client, owner, injector = world
    before = await counts(app, owner)
    with injector.armed({fail_at}):
        try:
            await client.tunnel(owner)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
            failed = True
        else:
            failed = False
    after = await counts(app, owner)
    if failed:
        assert injector.failed == 1  # the injected failure, not another
        assert after == before  # no tunnel, event, delivery or OK audit entry
    else:
        assert injector.failed == 0  # the use case wrote fewer statements than fail_at
        assert after == tuple(n + 1 for n in before)  # one of each, all of them


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(writers=st.integers(2, 6), fail=st.sets(st.integers(1, 30), max_size=4))
async def test_concurrent_writers_with_etags_lose_no_update(
    world: tuple[App, Client, TestUser, Injector], writers: int, fail: set[int]
) -> None:
    _app, client, owner, injector = world
    made = await client.tunnel(owner)
    name = P.GetTunnelRequest(name=made.name)

    async def write(mark: str) -> int:
        tries = 0
        while True:
            tries += 1
            found = await client.tunnels.GetTunnel(name, metadata=owner.metadata)
            change = P.UpdateTunnelRequest(
                tunnel=P.Tunnel(
                    name=made.name, description=found.description + mark, etag=found.etag
                ),
                update_mask={"paths": ["description"]},
            )
            try:
                await client.tunnels.UpdateTunnel(change, metadata=owner.metadata)
            except grpc.aio.AioRpcError as error:
                assert error.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE)
                assert tries < 100
                continue
            return tries

    marks = [f"w{i};" for i in range(writers)]
    with injector.armed(fail):
        await asyncio.gather(*(write(m) for m in marks))
    final = await client.tunnels.GetTunnel(name, metadata=owner.metadata)
    assert sorted(re.findall(r"w\d+;", final.description)) == sorted(marks)
