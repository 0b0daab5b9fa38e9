"""Property 1: health check consistency (server/health.py).

The pure rule: a service serves iff every dependency it needs is up, the server as a
whole iff every dependency is up, and nothing serves while shutting down. Then the same
rule observed end to end: HealthMonitor publishing to a real grpc.health.v1 server,
read back over a real channel.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from hypothesis import given
from hypothesis import strategies as st

from server.grpc_server import add_health
from server.health import DependencyStatus, HealthMonitor, evaluate

DEPENDENCIES = ["database", "redis", "queue", "dns"]
SERVICES = ["tunnelplane.v1.Users", "tunnelplane.v1.Auth", "tunnelplane.v1.Tiers", "svc.Other"]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

states = st.dictionaries(st.sampled_from(DEPENDENCIES), st.booleans())


@st.composite
def worlds(draw: st.DrawFn) -> tuple[dict[str, bool], dict[str, frozenset[str]]]:
    """Dependency states and, for some services, the (known) dependencies they need."""
    up = draw(states)
    needed = st.frozensets(st.sampled_from(sorted(up))) if up else st.just(frozenset[str]())
    needs = draw(st.dictionaries(st.sampled_from(SERVICES), needed))
    return up, needs


@given(world=worlds(), shutting_down=st.booleans())
def test_serving_iff_needed_dependencies_are_up(
    world: tuple[dict[str, bool], dict[str, frozenset[str]]], *, shutting_down: bool
) -> None:
    up, needs = world
    statuses = evaluate(up, needs, shutting_down=shutting_down)
    assert set(statuses) == {"", *needs}
    if shutting_down:
        assert not any(statuses.values())
        return
    assert statuses[""] == all(up.values())
    for service, deps in needs.items():
        assert statuses[service] == all(up[dep] for dep in deps)


@given(up=states, unknown=st.text(min_size=1).filter(lambda d: d not in DEPENDENCIES))
def test_a_dependency_nobody_probes_counts_as_down(up: dict[str, bool], unknown: str) -> None:
    statuses = evaluate(up, {"svc": frozenset({unknown})}, shutting_down=False)
    assert statuses == {"svc": False, "": False}


@given(world=worlds())
def test_more_dependencies_up_never_stops_a_service(
    world: tuple[dict[str, bool], dict[str, frozenset[str]]],
) -> None:
    up, needs = world
    before = evaluate(up, needs, shutting_down=False)
    after = evaluate(dict.fromkeys(up, True), needs, shutting_down=False)
    assert all(after[name] for name in before)


# --- HealthMonitor against a real grpc.health.v1 server --------------------------------

USERS, AUTH = "tunnelplane.v1.Users", "tunnelplane.v1.Auth"
NEEDS = {USERS: frozenset({"database", "redis"}), AUTH: frozenset({"database"})}


@dataclass
class Dependency:
    """A dependency whose probe the test controls."""

    up: bool = True
    hang: bool = False

    async def check(self) -> None:
        if self.hang:
            await asyncio.Event().wait()  # never set: only the monitor's timeout ends it
        if not self.up:
            raise ConnectionError("connection refused")


@dataclass
class Harness:
    servicer: HealthServicer
    stub: health_pb2_grpc.HealthStub
    deps: dict[str, Dependency]
    monitor: HealthMonitor

    async def status(self, service: str) -> int:
        request = health_pb2.HealthCheckRequest(service=service)
        response = await self.stub.Check(request, timeout=5)
        return int(response.status)

    async def statuses(self) -> dict[str, int]:
        return {name: await self.status(name) for name in ["", USERS, AUTH]}


@pytest_asyncio.fixture
async def harness() -> AsyncIterator[Harness]:
    server = grpc.aio.server()
    servicer = add_health(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    deps = {"database": Dependency(), "redis": Dependency()}
    checks = {name: dep.check for name, dep in deps.items()}
    monitor = HealthMonitor(servicer, checks, NEEDS, interval=60, timeout=0.05)
    try:
        yield Harness(servicer, health_pb2_grpc.HealthStub(channel), deps, monitor)
    finally:
        await channel.close()
        await server.stop(None)


def _expected(up: dict[str, bool], *, shutting_down: bool = False) -> dict[str, int]:
    statuses = evaluate(up, NEEDS, shutting_down=shutting_down)
    return {name: SERVING if statuses[name] else NOT_SERVING for name in ["", USERS, AUTH]}


async def test_nothing_serves_before_the_first_probe(harness: Harness) -> None:
    assert not harness.monitor.serving()
    assert not harness.monitor.serving(USERS)
    assert harness.monitor.dependencies == {
        "database": DependencyStatus(up=False, error="not checked yet"),
        "redis": DependencyStatus(up=False, error="not checked yet"),
    }


async def test_published_status_follows_every_combination_of_dependencies(
    harness: Harness,
) -> None:
    for database, redis in itertools.product([True, False], repeat=2):
        harness.deps["database"].up, harness.deps["redis"].up = database, redis
        await harness.monitor.check_once()
        up = {"database": database, "redis": redis}
        assert await harness.statuses() == _expected(up)
        for name in ["", USERS, AUTH]:
            assert harness.monitor.serving(name) == (_expected(up)[name] == SERVING)
        for name, is_up in up.items():
            expected = (
                DependencyStatus(up=True)
                if is_up
                else DependencyStatus(up=False, error="ConnectionError")
            )
            assert harness.monitor.dependencies[name] == expected


async def test_a_hanging_dependency_is_down_after_the_timeout(harness: Harness) -> None:
    harness.deps["redis"].hang = True
    await harness.monitor.check_once()
    assert harness.monitor.dependencies["redis"] == DependencyStatus(up=False, error="TimeoutError")
    assert await harness.statuses() == _expected({"database": True, "redis": False})


async def test_unknown_service_is_not_found(harness: Harness) -> None:
    await harness.monitor.check_once()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.status("tunnelplane.v1.Nope")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_shutdown_is_final(harness: Harness) -> None:
    await harness.monitor.check_once()
    assert await harness.statuses() == _expected({"database": True, "redis": True})
    await harness.monitor.shutdown()
    everything_down = dict.fromkeys(["", USERS, AUTH], NOT_SERVING)
    assert await harness.statuses() == everything_down
    await harness.monitor.check_once()  # dependencies all up again, still shutting down
    assert await harness.statuses() == everything_down
    assert not harness.monitor.serving()


async def test_watchers_see_each_change(harness: Harness) -> None:
    await harness.monitor.check_once()
    call = harness.stub.Watch(health_pb2.HealthCheckRequest(service=AUTH), timeout=5)
    try:
        assert (await call.read()).status == SERVING
        harness.deps["database"].up = False
        await harness.monitor.check_once()
        assert (await call.read()).status == NOT_SERVING
        harness.deps["database"].up = True
        await harness.monitor.check_once()
        assert (await call.read()).status == SERVING
    finally:
        call.cancel()
