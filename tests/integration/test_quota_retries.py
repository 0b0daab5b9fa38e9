"""A request id collapses genuine retries only, over gRPC (``x-request-id``) and HTTP
(``X-Request-Id``), on both backends: a call counts against the monthly quota unless the
same subject already made the same call (method and request) with the same id.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import grpc
import httpx
import pytest
import pytest_asyncio
from tunnelplane.v1 import users_pb2

from server.app import App
from server.domain.identity.model import Tier
from server.domain.identity.tiers import DEFAULT_TIERS
from tests.conftest import Backend, started
from tests.helpers import (
    BEHIND_PROXY,
    SETUP,
    Client,
    TestUser,
    bearer,
    client_of,
    fails,
    fresh_ip,
    http_of,
    reason,
)

ME = users_pb2.GetUserRequest(name="users/me")
USAGE = users_pb2.GetUsageRequest(name="users/me/usage")
QUOTA = 50
TIERS = {
    **DEFAULT_TIERS,
    "premium": replace(
        DEFAULT_TIERS["premium"], requests_per_minute=60_000, burst=200, requests_per_month=QUOTA
    ),
}


@pytest_asyncio.fixture(scope="module")
async def server(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[App]:
    """A server whose premium tier allows 50 requests a month; loopback is not exempt."""
    directory = tmp_path_factory.mktemp("retries")
    async with started(backend.settings(directory, **BEHIND_PROXY, tiers=TIERS)) as app:
        yield app


@pytest_asyncio.fixture(scope="module")
async def client(server: App) -> AsyncIterator[Client]:
    async with client_of(server, SETUP) as made:
        yield made


@pytest_asyncio.fixture
async def http(server: App) -> AsyncIterator[httpx.AsyncClient]:
    async with http_of(server) as client:
        yield client


@pytest_asyncio.fixture
async def user(client: Client) -> TestUser:
    return await client.new_user(tier=Tier.PREMIUM)


@pytest.fixture
def ip() -> str:
    return fresh_ip()


Metadata = tuple[tuple[str, str], ...]


def grpc_metadata(ip: str, credential: Metadata, request_id: str) -> Metadata:
    return (("x-forwarded-for", ip), ("x-request-id", request_id), *credential)


def http_headers(ip: str, credential: Metadata, request_id: str = "") -> dict[str, str]:
    headers = {"x-forwarded-for": ip, **dict(credential)}
    if request_id:
        headers["x-request-id"] = request_id
    return headers


async def used_over_grpc(client: Client, user: TestUser, ip: str) -> int:
    usage = await client.users.GetUsage(USAGE, metadata=(("x-forwarded-for", ip), *user.metadata))
    return int({q.metric: q.used for q in usage.quotas}["requests"])


async def used_over_http(http: httpx.AsyncClient, user: TestUser, ip: str) -> int:
    reply = await http.get("/v1/users/me/usage", headers=http_headers(ip, user.metadata))
    assert reply.status_code == 200, reply.text
    return int({q["metric"]: int(q["used"]) for q in reply.json()["quotas"]}["requests"])


async def test_distinct_grpc_calls_sharing_a_request_id_each_count(
    client: Client, user: TestUser, ip: str
) -> None:
    metadata = grpc_metadata(ip, user.metadata, "one-id-for-all")
    for size in range(1, QUOTA + 1):
        request = users_pb2.ListActivityRequest(parent="users/me", page_size=size)
        await client.users.ListActivity(request, metadata=metadata)
    assert await used_over_grpc(client, user, ip) == QUOTA
    error = await fails(
        client.users.GetUser(ME, metadata=metadata), grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert reason(error) == "QUOTA_EXCEEDED"


async def test_distinct_http_calls_sharing_a_request_id_each_count(
    http: httpx.AsyncClient, user: TestUser, ip: str
) -> None:
    headers = http_headers(ip, user.metadata, "one-id-for-all")
    for size in range(1, QUOTA + 1):
        reply = await http.get(f"/v1/users/me/activity?pageSize={size}", headers=headers)
        assert reply.status_code == 200, reply.text
    assert await used_over_http(http, user, ip) == QUOTA
    refused = await http.get("/v1/users/me", headers=headers)
    assert refused.status_code == 429
    assert "QUOTA_EXCEEDED" in refused.text


async def test_over_grpc_only_a_true_retry_counts_once(
    client: Client, user: TestUser, ip: str
) -> None:
    key = bearer(await client.api_key(user))  # counted too (an exempt address is counted)
    before = await used_over_grpc(client, user, ip)
    session = grpc_metadata(ip, user.metadata, "r-1")
    await client.users.GetUser(ME, metadata=session)
    await client.users.GetUser(ME, metadata=session)  # a retry: same subject, method, body
    assert await used_over_grpc(client, user, ip) == before + 1
    await client.users.GetTier(users_pb2.GetTierRequest(name="tiers/free"), metadata=session)
    assert await used_over_grpc(client, user, ip) == before + 2, "another method counts"
    other = users_pb2.GetTierRequest(name="tiers/premium")
    await client.users.GetTier(other, metadata=session)
    assert await used_over_grpc(client, user, ip) == before + 3, "another request counts"
    as_key = grpc_metadata(ip, key, "r-1")
    await client.users.GetUser(ME, metadata=as_key)
    await client.users.GetUser(ME, metadata=as_key)
    assert await used_over_grpc(client, user, ip) == before + 4, "another subject counts, once"


async def test_over_http_only_a_true_retry_counts_once(
    client: Client, http: httpx.AsyncClient, user: TestUser, ip: str
) -> None:
    key = bearer(await client.api_key(user))  # counted too (an exempt address is counted)
    before = await used_over_http(http, user, ip)
    session = http_headers(ip, user.metadata, "r-1")
    for _ in range(2):  # the call and its retry
        assert (await http.get("/v1/users/me", headers=session)).status_code == 200
    assert await used_over_http(http, user, ip) == before + 1
    assert (await http.get("/v1/tiers/free", headers=session)).status_code == 200
    assert await used_over_http(http, user, ip) == before + 2, "another method counts"
    assert (await http.get("/v1/tiers/premium", headers=session)).status_code == 200
    assert await used_over_http(http, user, ip) == before + 3, "another request counts"
    as_key = http_headers(ip, key, "r-1")
    for _ in range(2):
        assert (await http.get("/v1/users/me", headers=as_key)).status_code == 200
    assert await used_over_http(http, user, ip) == before + 4, "another subject counts, once"
    # Without an id of the caller's, nothing is a retry (the gateway makes one up).
    for _ in range(2):
        reply = await http.get("/v1/users/me", headers=http_headers(ip, user.metadata))
        assert reply.status_code == 200
    assert await used_over_http(http, user, ip) == before + 6
