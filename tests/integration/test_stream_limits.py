"""Long streams are bounded: per user and tier, only so many watches and agent streams at
once (over gRPC and HTTP alike), and a stream whose credential stops verifying ends within
the re-check interval even when it has nothing to send."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2
from tunnelplane.v1 import auth_pb2, tunnels_pb2

from server.app import App
from server.domain.identity.model import Tier
from server.domain.identity.tiers import DEFAULT_TIERS
from tests.conftest import Backend, own_server
from tests.helpers import (
    Agent,
    Client,
    TestUser,
    client_of,
    detail,
    eventually,
    fails,
    http_of,
    reason,
    watch_synced,
)

P = tunnels_pb2
RECHECK = 0.5
FREE_WATCHES = 2


@pytest_asyncio.fixture(scope="module")
async def limited(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[App]:
    """A server whose free tier allows two watches and one agent stream, and which checks
    streams' credentials every half second."""
    tiers = dict(DEFAULT_TIERS)
    tiers["free"] = dataclasses.replace(
        tiers["free"], max_watch_streams=FREE_WATCHES, max_agent_streams=1
    )
    directory = tmp_path_factory.mktemp("streams")
    async with own_server(
        backend, directory, tiers=tiers, stream_recheck_interval=RECHECK
    ) as server:
        yield server


@pytest_asyncio.fixture(scope="module")
async def lc(limited: App) -> AsyncIterator[Client]:
    async with client_of(limited) as client:
        yield client


@pytest_asyncio.fixture(scope="module")
async def lhttp(limited: App) -> AsyncIterator[httpx.AsyncClient]:
    async with http_of(limited) as client:
        yield client


def grpc_watch(client: Client, user: TestUser) -> Any:
    return client.tunnels.WatchTunnels(
        P.WatchTunnelsRequest(name="users/me"), metadata=user.metadata
    )


def sse_headers(user: TestUser) -> dict[str, str]:
    return {"authorization": f"Bearer {user.access_token}", "accept": "text/event-stream"}


def quota_failure(error: grpc.aio.AioRpcError) -> error_details_pb2.QuotaFailure.Violation:
    found = detail(error, error_details_pb2.QuotaFailure)
    assert found is not None
    (violation,) = found.violations
    return violation


# --- caps ---------------------------------------------------------------------------------


async def test_a_free_users_watch_beyond_the_cap_is_refused_on_both_transports(
    lc: Client, lhttp: httpx.AsyncClient
) -> None:
    owner = await lc.new_user()
    held = grpc_watch(lc, owner)
    await watch_synced(held)
    async with lhttp.stream("GET", "/v1/users/me/tunnels:watch", headers=sse_headers(owner)) as sse:
        assert sse.status_code == 200  # the second (and last) slot, over HTTP
        lines = sse.aiter_lines()  # kept: a dropped line iterator closes the response
        await anext(lines)

        refused = await fails(
            watch_synced(grpc_watch(lc, owner)), grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        assert reason(refused) == "STREAM_LIMIT_EXCEEDED"
        violation = quota_failure(refused)
        assert (violation.quota_id, violation.quota_value) == ("MaxWatchStreams", FREE_WATCHES)
        assert violation.subject == owner.name
        assert "max_watch_streams" in violation.description

        over_http = await lhttp.get("/v1/users/me/tunnels:watch", headers=sse_headers(owner))
        assert over_http.status_code == 429
        body = over_http.json()
        assert body["code"] == 8
        failure = next(d for d in body["details"] if d["@type"].endswith("QuotaFailure"))
        assert failure["violations"][0]["quotaId"] == "MaxWatchStreams"

        # Another user, and a premium one with a higher cap, are not affected.
        other = await lc.new_user()
        await watch_synced(grpc_watch(lc, other))
        premium = await lc.new_user(tier=Tier.PREMIUM)
        for _ in range(FREE_WATCHES + 1):
            await watch_synced(grpc_watch(lc, premium))
    held.cancel()


async def test_a_slot_is_given_back_when_its_stream_ends(lc: Client, limited: App) -> None:
    owner = await lc.new_user()
    streams = [grpc_watch(lc, owner) for _ in range(FREE_WATCHES)]
    for stream in streams:
        await watch_synced(stream)
    await fails(watch_synced(grpc_watch(lc, owner)), grpc.StatusCode.RESOURCE_EXHAUSTED)
    streams[0].cancel()

    async def freed() -> bool:
        return limited.api.stream_limits.open.held(owner.id, "max_watch_streams") < FREE_WATCHES

    await eventually(freed, within=10)
    await watch_synced(grpc_watch(lc, owner))


async def test_an_http_watch_gives_its_slot_back_when_the_client_leaves(
    lc: Client, lhttp: httpx.AsyncClient, limited: App
) -> None:
    owner = await lc.new_user()
    url, headers = "/v1/users/me/tunnels:watch", sse_headers(owner)
    for _ in range(3):  # more watches, one after the other, than the cap
        async with lhttp.stream("GET", url, headers=headers) as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            await anext(lines)

        async def released() -> bool:
            return limited.api.stream_limits.open.held(owner.id, "max_watch_streams") == 0

        await eventually(released, within=10)


async def test_agent_streams_beyond_the_cap_are_refused(lc: Client) -> None:
    owner = await lc.new_user()
    made = await lc.tunnel(owner, endpoints=[P.TunnelEndpoint(url="tcp://127.0.0.1:7")])
    key = await lc.api_key(owner, ["agent.connect"])
    first = Agent(lc.agents, key, made.name, "agent-1")
    assert (await first.greet()).WhichOneof("kind") == "welcome"
    second = Agent(lc.agents, key, made.name, "agent-2")
    refused = await fails(second.greet(), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert quota_failure(refused).quota_id == "MaxAgentStreams"
    first.stream.cancel()


async def test_healthz_stays_fast_while_a_user_holds_their_maximum(
    lc: Client, lhttp: httpx.AsyncClient
) -> None:
    owner = await lc.new_user()
    url, headers = "/v1/users/me/tunnels:watch", sse_headers(owner)
    async with (
        lhttp.stream("GET", url, headers=headers) as one,
        lhttp.stream("GET", url, headers=headers) as two,
    ):
        assert (one.status_code, two.status_code) == (200, 200)
        loop = asyncio.get_running_loop()

        async def health() -> float:
            started = loop.time()
            assert (await lhttp.get("/healthz")).status_code == 200
            return loop.time() - started

        extra = [lhttp.get(url, headers=headers) for _ in range(60)]
        results = await asyncio.gather(*extra, *(health() for _ in range(10)))
        refused, timings = results[:60], results[60:]
    assert {r.status_code for r in refused} == {429}  # type: ignore[union-attr]
    assert max(timings) < 1.0, timings  # type: ignore[type-var]


# --- credentials re-checked on a timer ---------------------------------------------------


async def test_an_idle_watch_ends_within_the_interval_when_its_user_logs_out(
    lc: Client, lhttp: httpx.AsyncClient
) -> None:
    owner = await lc.new_user()
    over_grpc = grpc_watch(lc, owner)
    await watch_synced(over_grpc)
    loop = asyncio.get_running_loop()
    async with lhttp.stream("GET", "/v1/users/me/tunnels:watch", headers=sse_headers(owner)) as sse:
        lines = sse.aiter_lines()
        assert (await anext(lines)).startswith("data: ")  # SYNCED: the watch is idle now
        await lc.auth.Logout(auth_pb2.LogoutRequest(), metadata=owner.metadata)
        logged_out = loop.time()
        async with asyncio.timeout(RECHECK + 5.0):
            error = await fails(over_grpc.read(), grpc.StatusCode.UNAUTHENTICATED)
            ended_grpc = loop.time() - logged_out
            rest = [line async for line in lines if line]
            ended_http = loop.time() - logged_out
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert rest[0] == "event: error"
    assert '"code":16' in rest[1]
    assert max(ended_grpc, ended_http) < RECHECK + 3.0


async def test_an_idle_agent_stream_ends_when_its_key_is_revoked(lc: Client) -> None:
    owner = await lc.new_user()
    made = await lc.tunnel(owner, endpoints=[P.TunnelEndpoint(url="tcp://127.0.0.1:7")])
    created = await lc.auth.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(
            parent=owner.name, api_key=auth_pb2.ApiKey(display_name="k", scopes=["agent.connect"])
        ),
        metadata=owner.metadata,
    )
    agent = Agent(lc.agents, created.secret, made.name, "agent-1")
    await agent.greet()
    await lc.auth.RevokeApiKey(
        auth_pb2.RevokeApiKeyRequest(name=created.api_key.name), metadata=owner.metadata
    )

    async def until_the_end() -> None:
        while await agent.stream.read() is not grpc.aio.EOF:
            pass  # the desired state, sent once; the agent itself stays silent

    async with asyncio.timeout(RECHECK + 5.0):
        await fails(until_the_end(), grpc.StatusCode.UNAUTHENTICATED)
