"""Read replicas and failover against real PostgreSQL servers of the test's own: a
primary (``initdb``) and its streaming replica (``pg_basebackup -R``), on ports of their
own (tests/pgcluster.py).

- Lag-tolerant reads go to the replica; one that lags beyond ``TP_REPLICA_MAX_LAG`` or
  stops is skipped (reads go to the primary), with the metrics and the status showing it,
  over gRPC and HTTP; the caller who has just written reads its write at once.
- With a multi-host URL (``target_session_attrs=read-write``), the server keeps serving
  writes, without a restart, after the primary stops and the replica is promoted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from tunnelplane.v1 import admin_pb2, users_pb2

from server.app import App
from server.domain.identity.model import Role
from tests.conftest import make_settings, migrate, started
from tests.helpers import Client, TestUser, eventually
from tests.pgcluster import Cluster, primary_and_replica

pytestmark = pytest.mark.slow
STATUS = admin_pb2.GetSystemStatusRequest()


@pytest_asyncio.fixture
async def cluster() -> AsyncIterator[Cluster]:
    with primary_and_replica() as made:
        await migrate(made.primary.url)
        await eventually(made.replayed, within=30)
        yield made


def reads(app: App, target: str) -> float:
    return app.registry.get_sample_value("tunnelplane_db_reads_total", {"target": target}) or 0.0


async def rename(client: Client, user: TestUser, name: str) -> None:
    await client.users.UpdateUser(
        users_pb2.UpdateUserRequest(
            user=users_pb2.User(name=user.name, display_name=name),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        ),
        metadata=user.metadata,
    )


async def name_seen(client: Client, reader: TestUser, user: TestUser) -> str:
    got = await client.users.GetUser(
        users_pb2.GetUserRequest(name=user.name), metadata=reader.metadata
    )
    return got.display_name


async def test_reads_follow_the_replica_while_it_is_close_and_up(
    cluster: Cluster, tmp_path: Path
) -> None:
    settings = make_settings(
        tmp_path,
        database_url=cluster.primary.url,
        database_replica_url=cluster.replica.url,
        replica_max_lag=0.5,
        health_interval=0.1,
    )
    async with started(settings) as app:
        monitor = app.health.monitor
        await monitor.wait_for("database_replica", up=True)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            client = Client(app, channel)
            admin = await client.new_user(role=Role.SUPER_ADMIN, tag="admin")
            user = await client.new_user()
            await rename(client, user, "first")
            # The admin has written nothing: its reads go to the replica, which has the
            # write once it has replayed it.
            before = reads(app, "replica")
            await eventually(cluster.replayed, within=10)
            assert await name_seen(client, admin, user) == "first"
            assert reads(app, "replica") > before
            assert app.registry.get_sample_value("tunnelplane_db_replica_in_use") == 1

            # Replay stops: the replica falls behind. The writer reads its own write at
            # once (from the primary); others read the replica's older state until the
            # probe finds the lag beyond 0.5 s, then the primary's.
            cluster.replica.execute("SELECT pg_wal_replay_pause()")
            await rename(client, user, "second")
            own = reads(app, "primary_own_write")
            assert await name_seen(client, user, user) == "second"
            assert reads(app, "primary_own_write") == own + 1
            await monitor.wait_for("database_replica", up=False)
            assert await name_seen(client, admin, user) == "second"
            assert (app.registry.get_sample_value("tunnelplane_db_replica_lag_seconds") or 0) > 0.5
            assert app.registry.get_sample_value("tunnelplane_db_replica_in_use") == 0
            degraded = await client.admin.GetSystemStatus(STATUS, metadata=admin.metadata)
            assert degraded.state == "DEGRADED"
            by_name = {d.name: d for d in degraded.dependencies}
            assert (by_name["database_replica"].up, by_name["database_replica"].optional) == (
                False,
                True,
            )
            assert by_name["database_replica"].error == "ReplicaLaggingError"
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as http:
                over_http = await http.get(
                    "/v1/system/status", headers={"authorization": admin.metadata[0][1]}
                )
                assert over_http.json()["state"] == "DEGRADED"
                ready = await http.get("/readyz")
                assert ready.status_code == 200  # still serving
                assert ready.json()["status"] == "DEGRADED"
                assert ready.json()["dependencies"] == {
                    "database": "SERVING",
                    "database_replica": "NOT_SERVING",
                }

            # Replay resumes: the replica is used again.
            cluster.replica.execute("SELECT pg_wal_replay_resume()")
            await monitor.wait_for("database_replica", up=True)
            serving = await client.admin.GetSystemStatus(STATUS, metadata=admin.metadata)
            assert serving.state == "SERVING"

            # The replica stops between two probes: no read fails; they go to the primary.
            cluster.replica.stop("immediate")
            for _ in range(5):
                assert await name_seen(client, admin, user) == "second"
            await monitor.wait_for("database_replica", up=False)
            assert app.registry.get_sample_value("tunnelplane_db_replica_in_use") == 0

            cluster.replica.start()
            await monitor.wait_for("database_replica", up=True)
            assert await name_seen(client, admin, user) == "second"


async def test_writes_go_on_after_the_replica_is_promoted(cluster: Cluster, tmp_path: Path) -> None:
    primary, replica = cluster.primary, cluster.replica
    both = (
        f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{replica.port}/postgres"
        "?target_session_attrs=read-write"
    )
    settings = make_settings(tmp_path, database_url=both, health_interval=0.1)
    async with (
        started(settings) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
    ):
        client = Client(app, channel)
        user = await client.new_user()
        acknowledged = ["before"]
        await rename(client, user, "before")

        primary.stop("fast")
        # While no host is writable, calls fail as UNAVAILABLE with RetryInfo.
        error = await _failing_write(client, user)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        status = rpc_status.from_call(error)
        assert status is not None
        assert _retry_info(status) is not None
        await app.health.monitor.wait_for("database", up=False)

        replica.promote()
        failures = 0
        async with asyncio.timeout(30):
            while True:
                try:
                    await rename(client, user, "after")
                    break
                except grpc.aio.AioRpcError as failed:
                    assert failed.code() == grpc.StatusCode.UNAVAILABLE, failed.details()
                    failures += 1
                    await asyncio.sleep(_retry_delay(failed))
        acknowledged.append("after")
        await app.health.monitor.wait_for("database", up=True)
        # Everything acknowledged is there, read back through the same server.
        got = await client.users.GetUser(
            users_pb2.GetUserRequest(name=user.name), metadata=user.metadata
        )
        assert got.display_name == acknowledged[-1]
        assert replica.execute("SELECT pg_is_in_recovery()") is False


async def _failing_write(client: Client, user: TestUser) -> grpc.aio.AioRpcError:
    try:
        await rename(client, user, "during")
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError("a write succeeded with no writable host")


def _retry_info(status: status_pb2.Status) -> error_details_pb2.RetryInfo | None:
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info
    return None


def _retry_delay(error: grpc.aio.AioRpcError) -> float:
    """What the server's RetryInfo asks for (a client honouring it), at most 0.2 s here."""
    status = rpc_status.from_call(error)
    info = _retry_info(status) if status is not None else None
    if info is None:
        return 0.2
    return min(0.2, float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9))
