"""Health over real gRPC: per-service and overall status follow the real dependencies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tunnelplane.v1 import admin_pb2, users_pb2

from server.app import App
from server.domain.identity.model import Role
from tests.conftest import REDIS_URL, make_settings, redis_prefix
from tests.helpers import Client, fails
from tests.tcpproxy import TcpProxy, in_front_of_redis

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = [
    "",
    "tunnelplane.v1.AuthService",
    "tunnelplane.v1.UserService",
    "tunnelplane.v1.AdminService",
    "tunnelplane.v1.AuditService",
    "tunnelplane.v1.ProxyService",
]


async def status(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
    return int(response.status)


async def next_status(stream: AsyncIterator[health_pb2.HealthCheckResponse], wanted: int) -> None:
    """Read a Watch stream until it reports ``wanted`` (bounded by a timeout)."""
    async with asyncio.timeout(15):
        async for update in stream:
            if update.status == wanted:
                return
    raise AssertionError("watch ended")


async def test_every_service_is_serving(app: App, channel: grpc.aio.Channel) -> None:
    for service in SERVICES:
        assert await status(channel, service) == SERVING
    await fails(
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="nope")),
        grpc.StatusCode.NOT_FOUND,
    )


@pytest.fixture
async def proxied_app(
    postgres_database: str, tmp_path: Path
) -> AsyncIterator[tuple[App, TcpProxy]]:
    """A server whose database (and Redis) connections go through cuttable proxies."""
    from tests.conftest import require_redis

    require_redis()
    db = urlsplit(postgres_database)
    proxy = TcpProxy(db.hostname or "127.0.0.1", db.port or 5432)
    await proxy.start()
    url = postgres_database.replace(f"{db.hostname}:{db.port}", f"127.0.0.1:{proxy.port}")
    from tests.conftest import migrate

    await migrate(postgres_database)
    server = App(
        make_settings(
            tmp_path,
            database_url=url,
            redis_url=REDIS_URL,
            redis_prefix=redis_prefix(),
            health_interval=0.1,
        )
    )
    await server.start()
    yield server, proxy
    await server.stop(grace=0)
    await proxy.cut()


async def test_database_outage_turns_health_not_serving_and_back(
    proxied_app: tuple[App, TcpProxy],
) -> None:
    server, proxy = proxied_app
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="tunnelplane.v1.UserService")
        )
        await next_status(watch, SERVING)

        await proxy.cut()
        await next_status(watch, NOT_SERVING)
        for service in SERVICES:
            assert await status(channel, service) == NOT_SERVING
        assert not server.health.monitor.dependencies["database"].up  # type: ignore[union-attr]
        # Calls that need the database fail as retryable UNAVAILABLE, never INTERNAL.
        client = Client(server, channel)
        await fails(client.register(), grpc.StatusCode.UNAVAILABLE)

        await proxy.start()
        await next_status(watch, SERVING)
        for service in SERVICES:
            assert await status(channel, service) == SERVING
        assert (await client.register()).name.startswith("users/")
        watch.cancel()


async def test_redis_outage_degrades_without_refusing_calls(
    postgres_database: str, tmp_path: Path
) -> None:
    """Redis is optional: while it is away the server keeps serving from in-process
    fallbacks and reports itself degraded; when it returns, Redis is used again."""
    from tests.conftest import migrate, require_redis

    require_redis()
    proxy = await in_front_of_redis(REDIS_URL)
    await migrate(postgres_database)
    server = App(
        make_settings(
            tmp_path,
            database_url=postgres_database,
            redis_url=f"redis://127.0.0.1:{proxy.port}/0",
            health_interval=0.1,
        )
    )
    await server.start()
    monitor = server.health.monitor
    assert monitor is not None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            client = Client(server, channel)
            admin = await client.new_user(role=Role.SUPER_ADMIN, tag="admin")
            status_request = admin_pb2.GetSystemStatusRequest()
            await monitor.wait_for("redis", up=True)
            before = await client.admin.GetSystemStatus(status_request, metadata=admin.metadata)
            assert (before.state, before.limiter_backend) == ("SERVING", "redis")

            await proxy.cut()
            await monitor.wait_for("redis", up=False)
            during = await client.admin.GetSystemStatus(status_request, metadata=admin.metadata)
            assert (during.state, during.limiter_backend) == ("DEGRADED", "memory")
            assert [(d.name, d.up, d.optional) for d in during.dependencies] == [
                ("database", True, False),
                ("redis", False, True),
            ]
            for service in SERVICES:
                assert await status(channel, service) == SERVING
            # Each dependency has its own health entry; one the server lacks is unknown.
            assert await status(channel, "tunnelplane.dependency.redis") == NOT_SERVING
            assert await status(channel, "tunnelplane.dependency.database") == SERVING
            await fails(
                status(channel, "tunnelplane.dependency.database_replica"),
                grpc.StatusCode.NOT_FOUND,
            )
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}") as http:
                ready = await http.get("/readyz")
            assert ready.status_code == 200
            assert ready.json()["status"] == "DEGRADED"
            assert ready.json()["dependencies"] == {"database": "SERVING", "redis": "NOT_SERVING"}
            assert (await client.register()).name.startswith("users/")

            await proxy.start()
            await monitor.wait_for("redis", up=True)
            after = await client.admin.GetSystemStatus(status_request, metadata=admin.metadata)
            assert (after.state, after.limiter_backend) == ("SERVING", "redis")
            me = users_pb2.GetUserRequest(name="users/me")
            await fails(client.users.GetUser(me), grpc.StatusCode.UNAUTHENTICATED)
    finally:
        await server.stop(grace=0)
        await proxy.cut()
