"""The Redis limiter: the same answers as the in-process one, one limit across replicas,
and no errors to callers when Redis dies and comes back.

All against real Redis: the shared one for the agreement property, a Redis started on a
spare port by the test for the outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from tunnelplane.v1 import admin_pb2, users_pb2, users_pb2_grpc

from server.app import App
from server.domain.identity.model import Role
from server.domain.identity.tiers import DEFAULT_TIERS
from server.domain.limits.model import BlockPolicy, Bucket, Check, Decision, Enforcement, Outcome
from server.storage.kv import redis_client
from server.storage.limiter import MemoryLimiter, RedisLimiter
from server.storage.resp import Address, RespConnection
from tests.conftest import REDIS_URL, make_settings, migrate, redis_prefix, require_redis
from tests.helpers import Client
from tests.processes import ServerProcess, child_env, run_cli, serving

EPOCH = 1_764_000_000_000.0
DAY_MS = 86_400_000.0
ME = users_pb2.GetUserRequest(name="users/me")

# --- the two backends agree -------------------------------------------------------------

step = st.fixed_dictionaries(
    {
        "gap": st.one_of(st.just(0.0), st.floats(0, 3000, allow_nan=False)),
        "subject": st.sampled_from(["users/a", "users/b"]),
        "ip": st.sampled_from(["10.0.0.1", "10.0.0.2"]),
        "cost": st.integers(1, 3),
        "max_wait_ms": st.sampled_from([0.0, 300.0, 1500.0]),
        "enforcement": st.sampled_from(list(Enforcement)),
        "dedupe": st.sampled_from(["", "r1", "r2"]),
        "quota": st.booleans(),
        # Anonymous (the address's block and limit apply) or authenticated (they do not).
        "by_address": st.booleans(),
        # Then add a persisted figure to the quota counter (if it exists).
        "seed": st.sampled_from([False, False, False, True]),
    }
)


def _same(memory: Decision, redis: Decision) -> bool:
    if memory.outcome == Outcome.IP_BLOCKED:
        # A block's remaining time is Redis's PTTL (its own clock), not the test's clock.
        return redis.outcome == Outcome.IP_BLOCKED
    return memory == redis


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(step, min_size=1, max_size=60),
    subject_bucket=st.builds(Bucket, st.integers(1, 600), st.integers(1, 6)),
    ip_bucket=st.builds(Bucket, st.integers(1, 1200), st.integers(1, 10)),
    quota_limit=st.integers(0, 8),
    block_after=st.integers(1, 6),
)
def test_redis_and_in_process_limiters_agree(
    steps: list[dict[str, object]],
    subject_bucket: Bucket,
    ip_bucket: Bucket,
    quota_limit: int,
    block_after: int,
) -> None:
    """Plan Property 9 across backends: the same calls at the same times get the same
    decisions (windows and blocks last a day here, so that Redis's own expiry clock never
    matters)."""
    require_redis()
    block = BlockPolicy(block_after, DAY_MS, DAY_MS)

    async def run() -> None:
        client = redis_client(REDIS_URL)
        prefix = redis_prefix()
        connection = RespConnection(Address.parse(REDIS_URL))
        redis, memory = RedisLimiter(client, prefix, connection), MemoryLimiter()
        now = EPOCH
        try:
            for i, s in enumerate(steps):
                now += float(s["gap"])  # type: ignore[arg-type]
                quota = s["quota"]
                check = Check(
                    subject=str(s["subject"]), ip=str(s["ip"]),
                    subject_bucket=subject_bucket, ip_bucket=ip_bucket,
                    cost=int(s["cost"]), max_wait_ms=float(s["max_wait_ms"]),  # type: ignore[call-overload, arg-type]
                    quota_key=f"quota:requests:{s['subject']}:202611" if quota else "",
                    quota_limit=quota_limit, quota_reset_ms=DAY_MS,
                    dedupe=f"{s['subject']}:{s['dedupe']}" if s["dedupe"] else "",
                    enforcement=s["enforcement"],  # type: ignore[arg-type]
                    block=block, now_ms=now, by_address=bool(s["by_address"]),
                )  # fmt: skip
                expected, got = await memory.decide(check), await redis.decide(check)
                assert _same(expected, got), (i, check, expected, got)
                if s["seed"] and check.quota_key:
                    seeded = (
                        await memory.seed(check.quota_key, 2),
                        await redis.seed(check.quota_key, 2),
                    )
                    assert seeded[0] == seeded[1], (i, check, seeded)
        finally:
            keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()
            await connection.close()

    asyncio.run(run())


# --- one limit across replicas ----------------------------------------------------------


async def _discard_log(server: ServerProcess) -> None:
    """Keep reading a child's log so that it never blocks on a full pipe."""
    assert server.process.stderr is not None
    while await server.process.stderr.readline():
        pass


@pytest.mark.slow
async def test_replicas_share_one_limit(tmp_path: Path) -> None:
    """Two server processes on one Redis; one client alternates between them as fast as it
    can. Together they admit what one would: the burst plus the steady rate."""
    require_redis()
    burst, per_minute = 5, 60  # one a second after the burst
    shared = {
        "TP_REDIS_URL": REDIS_URL,
        "TP_REDIS_PREFIX": redis_prefix(),
        "TP_TIER_FREE_REQUESTS_PER_MINUTE": str(per_minute),
        "TP_TIER_FREE_BURST": str(burst),
        "TP_RATE_QUEUE_MAX_WAIT": "0",
        "TP_IP_BLOCK_AFTER": "1000000",
        "TP_LOG_LEVEL": "WARNING",
    }
    envs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        env = child_env(tmp_path / name, **shared)
        env["TP_LOG_LEVEL"] = "INFO"  # the "serving" line names the ports
        assert run_cli("migrate", env=env).returncode == 0
        envs.append(env)
    async with serving(envs[0]) as a, serving(envs[1]) as b:
        drains = [asyncio.create_task(_discard_log(s)) for s in (a, b)]
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{s.grpc_port}") for s in (a, b)]
        stubs = [users_pb2_grpc.UserServiceStub(c) for c in channels]
        admitted = [0, 0]
        refused = [0, 0]
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:

            async def worker(offset: int) -> None:
                for i in itertools.count(offset):
                    if loop.time() - started > 2.0:
                        return
                    which = i % 2
                    try:
                        await stubs[which].ListTiers(users_pb2.ListTiersRequest())
                        admitted[which] += 1
                    except grpc.aio.AioRpcError as error:
                        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                        refused[which] += 1

            await asyncio.gather(*(worker(n) for n in range(8)))
            elapsed = loop.time() - started
        finally:
            for channel in channels:
                await channel.close()
            for drain in drains:
                drain.cancel()
    total = sum(admitted)
    bound = burst + int(elapsed * per_minute / 60) + 1
    assert burst <= total <= bound, (admitted, refused, elapsed)
    assert all(admitted), "both replicas served"
    assert all(refused), "both replicas refused"
    # Each replica alone would have admitted its own burst: the sum shows one shared limit.
    assert sum(refused) > 50


# --- Redis dies and comes back ----------------------------------------------------------


def _spare_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def redis_server(port: int, *extra: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """A throwaway ``redis-server`` on ``port``, ready when entered."""
    process = await asyncio.create_subprocess_exec(
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--loglevel", "notice", *extra,
        stdout=asyncio.subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        async with asyncio.timeout(15):
            while b"Ready to accept connections" not in await process.stdout.readline():
                pass
        drain = asyncio.create_task(process.stdout.read())
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        drain.cancel()


async def test_redis_killed_mid_run_falls_back_without_errors_and_returns(
    tmp_path: Path,
) -> None:
    require_redis()  # the redis-server binary comes with it
    port = _spare_port()
    tiers = {**DEFAULT_TIERS, "free": replace(DEFAULT_TIERS["free"], burst=10_000)}
    database = f"sqlite+aiosqlite:///{tmp_path / 'tunnelplane.db'}"
    await migrate(database)
    settings_ = make_settings(
        tmp_path,
        database_url=database,
        redis_url=f"redis://127.0.0.1:{port}/0",
        redis_prefix="tp:",
        health_interval=0.05,
        rate_exempt_ips="",
        tiers=tiers,
    )
    async with redis_server(port) as first:
        await _outage(settings_, first, port)


async def _outage(settings_: object, first: asyncio.subprocess.Process, port: int) -> None:
    server = App(settings_)  # type: ignore[arg-type]
    await server.start()
    monitor = server.health
    assert monitor is not None
    errors: list[str] = []
    served = {"redis": 0, "memory": 0}
    stop = asyncio.Event()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            client = Client(server, channel)
            user = await client.new_user()
            admin = await client.new_user(role=Role.SUPER_ADMIN, tag="admin")
            health = health_pb2_grpc.HealthStub(channel)

            async def caller() -> None:
                while not stop.is_set():
                    backend = server.limiter.backend
                    try:
                        await client.users.GetUser(ME, metadata=user.metadata)
                        served[backend] += 1
                    except grpc.aio.AioRpcError as error:
                        errors.append(f"{error.code()}: {error.details()}")

            async def served_more(backend: str, n: int) -> None:
                target = served[backend] + n
                async with asyncio.timeout(20):
                    while served[backend] < target:  # noqa: ASYNC110 - counted by the callers
                        await asyncio.sleep(0.01)

            async def system() -> admin_pb2.SystemStatus:
                return await client.admin.GetSystemStatus(
                    admin_pb2.GetSystemStatusRequest(), metadata=admin.metadata
                )

            callers = [asyncio.create_task(caller()) for _ in range(4)]
            await served_more("redis", 20)
            assert (await system()).limiter_backend == "redis"

            first.kill()  # mid-run, with calls in flight
            await first.wait()
            await monitor.wait_for("redis", up=False)
            await served_more("memory", 20)
            status = await system()
            assert (status.state, status.limiter_backend) == ("DEGRADED", "memory")
            check = await health.Check(health_pb2.HealthCheckRequest())
            assert check.status == health_pb2.HealthCheckResponse.SERVING

            async with redis_server(port):
                await monitor.wait_for("redis", up=True)
                await served_more("redis", 20)
                status = await system()
                assert (status.state, status.limiter_backend) == ("SERVING", "redis")
                # The new Redis holds the caller's state: the script was reloaded there.
                probe = redis_client(f"redis://127.0.0.1:{port}/0")
                try:
                    assert await probe.exists(f"tp:rl:users/{user.id}")
                finally:
                    await probe.aclose()
                stop.set()
                await asyncio.gather(*callers)
            switches = {
                to: server.registry.get_sample_value(
                    "tunnelplane_ratelimit_backend_switches_total", {"to": to}
                )
                for to in ("memory", "redis")
            }
            assert switches == {"memory": 1.0, "redis": 1.0}
    finally:
        stop.set()
        await server.stop(grace=0)
    assert errors == [], errors[:5]


async def test_the_lean_connection_signs_in_selects_and_recovers() -> None:
    require_redis()
    port = _spare_port()
    async with redis_server(port, "--requirepass", "s3cret") as process:
        good = RespConnection(Address.parse(f"redis://:s3cret@127.0.0.1:{port}/2"))
        bad = RespConnection(Address.parse(f"redis://:wrong@127.0.0.1:{port}/0"))
        try:
            assert await good.execute("SET", "k", "v") == b"OK"
            replies = await asyncio.gather(*(good.execute("INCR", "n") for _ in range(50)))
            assert replies == list(range(1, 51)), "replies are matched to commands in order"
            probe = redis_client(f"redis://:s3cret@127.0.0.1:{port}/2")
            try:
                assert await probe.get("k") == b"v"  # in database 2
            finally:
                await probe.aclose()
            with pytest.raises(ResponseError):
                await good.execute("NOSUCHCOMMAND")
            assert await good.execute("GET", "k") == b"v", "an error reply keeps the connection"
            with pytest.raises(RedisConnectionError, match="handshake"):
                await bad.execute("PING")
            process.kill()
            await process.wait()
            with pytest.raises(RedisConnectionError):
                await good.execute("GET", "k")
        finally:
            await good.close()
            await bad.close()
