"""Recovery endpoints, against a real server: an administrator runs a failed operation
again, lets go of a stuck holder's lease, and ends a tunnel's agent sessions; each is
refused when it makes no sense, and audited (tests/integration/test_audit.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import timestamp_pb2
from tunnelplane.v1 import admin_pb2, operations_pb2, tunnels_pb2, webhooks_pb2

from server.app import App
from server.domain.identity.model import Role
from server.storage.tables import operations as operations_table
from tests.conftest import sqlite_server
from tests.helpers import Agent, Client, TestUser, agent_key, client_of, eventually, fails, reason
from tests.webhook_receiver import Receiver

A = admin_pb2


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[tuple[App, Client, TestUser, TestUser]]:
    async with sqlite_server(tmp_path) as app, client_of(app) as client:
        admin = await client.new_user(role=Role.SUPER_ADMIN, tag="admin")
        owner = await client.new_user()
        yield app, client, admin, owner


async def a_replay(client: Client, owner: TestUser, rx: Receiver) -> str:
    hook = await client.webhook(owner, rx.url())
    start = timestamp_pb2.Timestamp()
    start.FromDatetime(datetime.now(UTC) - timedelta(hours=1))
    started = await client.webhooks.ReplayWebhookEvents(
        webhooks_pb2.ReplayWebhookEventsRequest(name=hook.name, start_time=start),
        metadata=owner.metadata,
    )
    return started.name


async def finished(client: Client, owner: TestUser, name: str) -> operations_pb2.Operation:
    async def done() -> operations_pb2.Operation | None:
        found = await client.operations.GetOperation(
            operations_pb2.GetOperationRequest(name=name), metadata=owner.metadata
        )
        return found if found.done else None

    return await eventually(done, within=15, every=0.05)


async def store(app: App, name: str, **values: Any) -> None:
    async with app.db.engine.begin() as conn:
        await conn.execute(
            sa.update(operations_table)
            .where(operations_table.c.id == name.rsplit("/", 1)[1])
            .values(**values)
        )


async def test_a_failed_operation_runs_again_from_its_cursor(world: Any) -> None:
    app, client, admin, owner = world
    async with Receiver() as rx:
        name = await a_replay(client, owner, rx)
        assert not (await finished(client, owner, name)).HasField("error")

        # Succeeded, it is not run again.
        rerun = A.RerunOperationRequest(name=name, reason="again")
        refused = await fails(
            client.admin.RerunOperation(rerun, metadata=admin.metadata),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        assert reason(refused) == "OPERATION_NOT_FAILED"

        await store(app, name, error_code=13, error_message="the receiver store was full")
        failed = await client.operations.GetOperation(
            operations_pb2.GetOperationRequest(name=name), metadata=owner.metadata
        )
        assert failed.error.code == 13
        again = await client.admin.RerunOperation(rerun, metadata=admin.metadata)
        assert (again.name, again.done) == (name, False)
        assert not (await finished(client, owner, name)).HasField("error")

        # A cancelled one is its owner's decision: not run again.
        await store(app, name, error_code=1, error_message="the operation was cancelled")
        await fails(
            client.admin.RerunOperation(rerun, metadata=admin.metadata),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        unknown = name.rsplit("/", 1)[1][:-4] + "zzzz"  # a well-formed id no one has
        missing = A.RerunOperationRequest(name=f"{owner.name}/operations/{unknown}")
        await fails(
            client.admin.RerunOperation(missing, metadata=admin.metadata),
            grpc.StatusCode.NOT_FOUND,
        )


async def test_a_stuck_holders_lease_is_released_and_the_work_goes_on(world: Any) -> None:
    app, client, admin, owner = world
    async with Receiver() as rx:
        name = await a_replay(client, owner, rx)
        await finished(client, owner, name)
        # A holder that took the operation and hangs: unfinished, leased for an hour.
        stuck_until = datetime.now(UTC) + timedelta(hours=1)
        await store(app, name, done=False, end_time=None, lease_until=stuck_until)
        release = A.ReleaseOperationLeaseRequest(name=name, reason="its holder hangs")
        released = await client.admin.ReleaseOperationLease(release, metadata=admin.metadata)
        assert not released.done
        assert not (await finished(client, owner, name)).HasField("error")
        # Finished, it holds no lease to release.
        refused = await fails(
            client.admin.ReleaseOperationLease(release, metadata=admin.metadata),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        assert reason(refused) == "OPERATION_NOT_LEASED"


async def test_reset_ends_the_agents_streams_and_they_reconnect(world: Any) -> None:
    _app, client, admin, owner = world
    made = await client.tunnel(
        owner, endpoints=[tunnels_pb2.TunnelEndpoint(url="tcp://127.0.0.1:7")]
    )
    agent = Agent(client.agents, await agent_key(client, owner), made.name)
    await agent.hello()
    await agent.desired()

    async def agents() -> int:
        found = await client.tunnels.GetTunnel(
            tunnels_pb2.GetTunnelRequest(name=made.name), metadata=owner.metadata
        )
        return found.connected_agents

    await eventually(lambda: _equals(agents(), 1), within=10)
    reset = await client.admin.ResetAgentSessions(
        A.ResetAgentSessionsRequest(name=made.name, reason="a lost replica's session"),
        metadata=admin.metadata,
    )
    assert reset.closed_sessions == 1
    told = await agent.next()
    assert told.WhichOneof("kind") == "go_away"
    assert await agents() == 0
    agent.stream.cancel()

    again = Agent(client.agents, await agent_key(client, owner), made.name)
    await again.hello()
    await eventually(lambda: _equals(agents(), 1), within=10)
    again.stream.cancel()


async def _equals(value: Any, expected: int) -> bool:
    return bool(await value == expected)
