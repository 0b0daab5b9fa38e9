"""``python -m server serve --workers 2`` as real processes on PostgreSQL and Redis: one
gRPC and one HTTP port for the group, calls served by both workers, a watch on one worker
hearing a change made through the other, a worker that dies replaced, SIGTERM stopping
the group within the grace, and the shared backends required."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
import httpx
import pytest
from google.protobuf import field_mask_pb2
from tunnelplane.v1 import (
    auth_pb2,
    auth_pb2_grpc,
    tunnels_pb2,
    tunnels_pb2_grpc,
    users_pb2,
    users_pb2_grpc,
)

from server.process_group import worker_cpu
from tests.conftest import (
    REDIS_URL,
    create_postgres_database,
    drop_postgres_database,
    migrate,
    redis_prefix,
    require_postgres,
    require_redis,
)
from tests.helpers import PASSWORD, Watch, eventually, fails, unique_email
from tests.processes import ROOT, ServerProcess, child_env, run_cli, serving

pytestmark = pytest.mark.slow
ME = users_pb2.GetUserRequest(name="users/me")
W = tunnels_pb2.WatchTunnelsResponse
GRACE = 10.0
#: Fresh connections tried before concluding that the kernel sends them all to one worker
#: (with two workers, 40 in a row to the same one has a chance of 2**-39).
CONNECTIONS = 40
Metadata = tuple[tuple[str, str], ...]
T = TypeVar("T")


@pytest.fixture
async def database() -> AsyncIterator[str]:
    """A migrated PostgreSQL database of the test's own (its workers claim rows)."""
    require_postgres()
    require_redis()
    url = create_postgres_database()
    try:
        await migrate(url)
        yield url
    finally:
        drop_postgres_database(url)


def group_env(directory: Path, database_url: str, **extra: str) -> dict[str, str]:
    """A group's environment: PostgreSQL, Redis under a prefix of its own, ports 0."""
    return child_env(
        directory,
        TP_DATABASE_URL=database_url,
        TP_REDIS_URL=REDIS_URL,
        TP_REDIS_PREFIX=redis_prefix(),
        TP_SHUTDOWN_GRACE=str(GRACE),
        TP_RATE_EXEMPT_IPS="127.0.0.0/8,::1",  # the test's calls are never rate limited
        **extra,
    )


async def sign_up(port: int) -> Metadata:
    """A new user's bearer metadata, registered and signed in over gRPC."""
    email = unique_email("workers")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        await auth.Register(auth_pb2.RegisterRequest(email=email, password=PASSWORD))
        login = await auth.Login(auth_pb2.LoginRequest(email=email, password=PASSWORD))
    return (("authorization", f"Bearer {login.tokens.access_token}"),)


async def worker_of(group: ServerProcess, request_id: str) -> int:
    """The index of the worker whose access log has the call ``request_id``."""
    found: list[int] = []

    def logged() -> bool:
        found.extend(
            int(entry["worker"])  # type: ignore[call-overload]
            for entry in group.log
            if entry.get("logger") == "tunnelplane.access" and entry.get("request_id") == request_id
        )
        return bool(found)

    await eventually(logged)
    return found[0]


async def one_per_worker(
    group: ServerProcess, connect: Callable[[str], Awaitable[T]], workers: int
) -> dict[int, T]:
    """Fresh connections until each worker has served one: ``connect(request_id)`` makes
    one and a call on it; the connection kept for each worker."""
    kept: dict[int, T] = {}
    for _ in range(CONNECTIONS):
        request_id = uuid.uuid4().hex
        connection = await connect(request_id)
        kept.setdefault(await worker_of(group, request_id), connection)
        if len(kept) == workers:
            return kept
    raise AssertionError(f"{CONNECTIONS} connections all reached workers {sorted(kept)}")


async def test_two_workers_share_the_ports_and_stop_together(database: str, tmp_path: Path) -> None:
    async with serving(group_env(tmp_path, database), "--workers", "2") as group:
        following = asyncio.create_task(group.follow_log())
        worker_pids = group.serving["worker_pids"]
        assert isinstance(worker_pids, list)
        assert len(set(worker_pids)) == 2
        assert os.getpid() not in worker_pids
        each = [e for e in group.log if e.get("message") == "serving" and "worker" in e]
        assert {(e["grpc_port"], e["http_port"]) for e in each} == {
            (group.grpc_port, group.http_port)
        }
        user = await sign_up(group.grpc_port)

        opened: list[grpc.aio.Channel] = []

        async def grpc_connection(request_id: str) -> grpc.aio.Channel:
            # A local subchannel pool: channels to one address otherwise share a connection.
            channel = grpc.aio.insecure_channel(
                f"127.0.0.1:{group.grpc_port}", options=[("grpc.use_local_subchannel_pool", 1)]
            )
            opened.append(channel)
            await users_pb2_grpc.UserServiceStub(channel).GetUser(
                ME, metadata=(*user, ("x-request-id", request_id))
            )
            return channel

        async def http_call(request_id: str) -> int:
            async with httpx.AsyncClient() as client:  # a connection of its own
                answer = await client.get(
                    f"http://127.0.0.1:{group.http_port}/v1/users/me",
                    headers={**dict(user), "x-request-id": request_id},
                )
            return answer.status_code

        channels = await one_per_worker(group, grpc_connection, 2)
        statuses = await one_per_worker(group, http_call, 2)
        assert set(statuses.values()) == {200}
        try:
            # A watch on worker 0 hears a change made through worker 1 (the Redis bus).
            on_0 = tunnels_pb2_grpc.TunnelServiceStub(channels[0])
            on_1 = tunnels_pb2_grpc.TunnelServiceStub(channels[1])
            made = await on_1.CreateTunnel(
                tunnels_pb2.CreateTunnelRequest(
                    parent="users/me", tunnel=tunnels_pb2.Tunnel(display_name="before")
                ),
                metadata=user,
            )
            watch = Watch(on_0, made.name, user)
            try:
                await watch.until(lambda m: m.kind == W.KIND_SYNCED)
                await on_1.UpdateTunnel(
                    tunnels_pb2.UpdateTunnelRequest(
                        tunnel=tunnels_pb2.Tunnel(
                            name=made.name, display_name="after", etag=made.etag
                        ),
                        update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
                    ),
                    metadata=user,
                )
                await watch.until(
                    lambda m: m.kind == W.KIND_CHANGED and m.tunnel.display_name == "after"
                )
            finally:
                watch.close()
        finally:
            for channel in opened:
                await channel.close()

        group.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(group.process.wait(), GRACE) == 0
        await following
    stopped = [e for e in group.log if e.get("message") == "stopped"]
    assert [e.get("worker", "supervisor") for e in stopped].count("supervisor") == 1
    assert {e.get("worker", "supervisor") for e in stopped} == {0, 1, "supervisor"}
    assert group.log[-1]["exit_codes"] == [0, 0]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{group.grpc_port}") as channel:
        await fails(
            users_pb2_grpc.UserServiceStub(channel).GetUser(ME, metadata=user, timeout=5),
            grpc.StatusCode.UNAVAILABLE,
        )


async def test_a_worker_that_dies_is_replaced(database: str, tmp_path: Path) -> None:
    async with serving(group_env(tmp_path, database), "--workers", "2") as group:
        following = asyncio.create_task(group.follow_log())
        worker_pids = group.serving["worker_pids"]
        assert isinstance(worker_pids, list)
        os.kill(worker_pids[1], signal.SIGKILL)

        def replaced() -> bool:
            return any(e.get("message") == "a worker replaced" for e in group.log)

        await eventually(replaced, within=30)  # a start, as serving() allows
        died = next(e for e in group.log if e.get("message") == "a worker died; starting another")
        assert (died["worker_index"], died["exit_code"]) == (1, -signal.SIGKILL)
        new = next(e for e in group.log if e.get("message") == "a worker replaced")
        assert new["worker_index"] == 1
        assert new["worker_pid"] not in worker_pids
        assert any(
            e.get("message") == "serving" and e.get("pid") == new["worker_pid"] for e in group.log
        )
        user = await sign_up(group.grpc_port)  # the group serves on
        async with grpc.aio.insecure_channel(f"127.0.0.1:{group.grpc_port}") as channel:
            await users_pb2_grpc.UserServiceStub(channel).GetUser(ME, metadata=user)

        group.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(group.process.wait(), GRACE) == 0
        await following


def thread_cpus(pid: int) -> set[frozenset[int]]:
    """The distinct CPU sets of every thread of process ``pid``."""
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return {frozenset(os.sched_getaffinity(int(task.name))) for task in tasks}


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's")
async def test_pinned_workers_run_every_thread_on_a_cpu_of_their_own(
    database: str, tmp_path: Path
) -> None:
    env = group_env(tmp_path, database, TP_WORKER_CPU_AFFINITY="auto")
    allowed = os.sched_getaffinity(0)
    async with serving(env, "--workers", "2") as group:
        worker_pids = group.serving["worker_pids"]
        assert isinstance(worker_pids, list)
        for index, pid in enumerate(worker_pids):
            assert thread_cpus(pid) == {frozenset({worker_cpu(index, allowed)})}
        assert thread_cpus(group.process.pid) == {frozenset(allowed)}  # the supervisor floats
        user = await sign_up(group.grpc_port)  # and the pinned group serves
        async with grpc.aio.insecure_channel(f"127.0.0.1:{group.grpc_port}") as channel:
            await users_pb2_grpc.UserServiceStub(channel).GetUser(ME, metadata=user)
        group.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(group.process.wait(), GRACE) == 0
    pinned = [e for e in group.log if e.get("message") == "pinned to a CPU"]
    assert sorted((e["worker"], e["cpu"]) for e in pinned) == [
        (index, worker_cpu(index, allowed)) for index in range(2)
    ]


async def test_sigterm_while_the_workers_start_stops_the_group(
    database: str, tmp_path: Path
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "serve", "--workers", "2",
        env=group_env(tmp_path, database), cwd=ROOT, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    group = ServerProcess(process)
    try:
        async with asyncio.timeout(30):
            while (await group.next_log_entry()).get("message") != "starting workers":
                pass
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), GRACE) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    await group.drain_log()
    assert group.log[-1]["message"] == "stopped"
    assert "serving" not in [e.get("message") for e in group.log if "worker" not in e]


async def test_a_worker_that_cannot_start_fails_the_group(database: str, tmp_path: Path) -> None:
    with socket.socket() as taken:  # worker 0's metrics port, held by someone else
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = group_env(tmp_path, database, TP_METRICS_PORT=str(port))
        result = await asyncio.to_thread(run_cli, "serve", "--workers", "2", env=env)
    assert result.returncode == 1
    assert '"message":"a worker failed to start"' in result.stderr
    assert '"worker_index":0' in result.stderr


@pytest.mark.parametrize(
    ("settings", "named", "not_named"),
    [
        ({}, ["TP_DATABASE_URL", "PostgreSQL", "TP_REDIS_URL"], []),
        ({"TP_REDIS_URL": REDIS_URL}, ["TP_DATABASE_URL", "PostgreSQL"], ["TP_REDIS_URL"]),
        (
            {"TP_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/postgres"},
            ["TP_REDIS_URL"],
            ["TP_DATABASE_URL"],
        ),
    ],
)
@pytest.mark.parametrize("workers", [("--workers", "2"), ("TP_WORKERS", "2")])
async def test_more_than_one_worker_needs_postgres_and_redis(
    tmp_path: Path,
    settings: dict[str, str],
    named: list[str],
    not_named: list[str],
    workers: tuple[str, str],
) -> None:
    flag, value = workers
    extra = {**settings, **({flag: value} if flag.startswith("TP_") else {})}
    args = ("serve", flag, value) if flag.startswith("--") else ("serve",)
    result = await asyncio.to_thread(run_cli, *args, env=child_env(tmp_path, **extra))
    assert result.returncode == 2
    assert result.stderr.startswith("configuration error: TP_WORKERS=2 ")
    for name in named:
        assert name in result.stderr
    for name in not_named:
        assert name not in result.stderr
    assert not (tmp_path / "jwt-signing-key.pem").exists()  # refused before anything
