"""Argon2 is no lever for anonymous callers: a taken address is refused before hashing, and
hashes run a bounded number at a time; one more is refused at once (RESOURCE_EXHAUSTED
with RetryInfo, HTTP 429 with Retry-After), never queued, while the server keeps
answering everything else."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2
from tunnelplane.v1 import users_pb2

from server.app import App
from tests.conftest import Backend, own_server, redis_prefix
from tests.helpers import PASSWORD, client_of, detail, fails, http_of, reason, unique_email

#: About a second per hash here: long enough that the answers below all come while one
#: registration is still hashing (they take milliseconds), without a clock in the test.
SLOW_HASHING = {"argon2_time_cost": 20, "argon2_memory_kib": 65536, "argon2_parallelism": 1}
CONCURRENT = 6


@pytest.fixture(scope="module")
async def server(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[App]:
    """A server of its own that computes one slow hash at a time."""
    async with own_server(
        backend,
        tmp_path_factory.mktemp("hashing"),
        **SLOW_HASHING,
        password_hash_concurrency=1,
        redis_prefix=redis_prefix(),
    ) as app:
        yield app


async def test_a_busy_hasher_refuses_at_once_and_everything_else_is_still_served(
    server: App,
) -> None:
    async with client_of(server) as client:
        taken = unique_email("taken")
        await client.register(taken)
        calls = [asyncio.ensure_future(client.register()) for _ in range(CONCURRENT)]
        await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
        # While one registration hashes, cheap calls are answered, a taken address is
        # refused without a hash, and a sign-in (a hash too) is refused like the rest.
        tiers = await client.users.ListTiers(users_pb2.ListTiersRequest())
        duplicate = await fails(client.register(taken), grpc.StatusCode.ALREADY_EXISTS)
        busy_login = await fails(client.login(taken), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert not all(call.done() for call in calls), "a hash should still be running"
        results = await asyncio.gather(*calls, return_exceptions=True)
    assert tiers.tiers
    assert reason(duplicate) == "ALREADY_EXISTS"
    created = [r for r in results if isinstance(r, users_pb2.User)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(created) + len(refused) == CONCURRENT, results
    assert created, "the hash that had the slot finished"
    assert refused, "the others were refused, not queued"
    for error in [*refused, busy_login]:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert reason(error) == "PASSWORD_HASHER_BUSY"
        retry = detail(error, error_details_pb2.RetryInfo)
        assert retry is not None
        assert retry.retry_delay.ToTimedelta().total_seconds() > 0


async def test_over_http_a_busy_hasher_is_429_with_retry_after(server: App) -> None:
    async with http_of(server, timeout=60) as http:
        taken = unique_email("taken")
        first = await http.post("/v1/auth:register", json={"email": taken, "password": PASSWORD})
        assert first.status_code == 200, first.text

        async def register() -> httpx.Response:
            body = {"email": unique_email(), "password": PASSWORD}
            return await http.post("/v1/auth:register", json=body)

        calls = [asyncio.ensure_future(register()) for _ in range(CONCURRENT)]
        await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
        tiers = await http.get("/v1/tiers")
        duplicate = await http.post(
            "/v1/auth:register", json={"email": taken, "password": PASSWORD}
        )
        assert not all(call.done() for call in calls), "a hash should still be running"
        responses: list[Any] = await asyncio.gather(*calls)
    assert tiers.status_code == 200, tiers.text
    assert duplicate.status_code == 409, duplicate.text
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes
    assert 429 in codes
    assert set(codes) == {200, 429}
    for response in responses:
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["details"][0]["reason"] == "PASSWORD_HASHER_BUSY"
