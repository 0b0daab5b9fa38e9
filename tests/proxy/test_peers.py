"""Instances of one proxy relay to each other: a request for a tunnel whose agent has no
lane at the instance it reached is carried to an instance that holds one, through the
registry they share — streaming, once, with the web client's address only when the hop
proves itself — and the registry in Redis publishes, expires and withdraws holdings."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace

import httpx
import pytest
import pytest_asyncio
import redis.asyncio as redis

from proxy.app import ProxyApp, ProxySettings
from proxy.peers import CLIENT_IP, HOP, MemoryPeers, RedisPeers
from proxy.web import WebSettings
from tests.conftest import REDIS_URL, reachable, redis_prefix
from tests.helpers import eventually
from tests.proxy.conftest import TUNNEL, TUNNEL_ID, Stack, close_stack, open_stack

TOKEN = "p" * 32


class Pair:
    """Instance ``a`` (no agent) and instance ``b`` (the agent's lanes), one registry."""

    def __init__(self, a: ProxyApp, b: Stack) -> None:
        self.a, self.b = a, b

    @property
    def base_a(self) -> str:
        return f"http://127.0.0.1:{self.a.port}/t/{TUNNEL_ID}"


@pytest_asyncio.fixture
async def pair() -> AsyncIterator[Pair]:
    shared: dict[str, dict[str, float]] = {}
    b = await open_stack(admin_token=TOKEN, peers=None)
    b.proxy.web.join(MemoryPeers(b.proxy.public_url, shared))
    await MemoryPeers(b.proxy.public_url, shared).publish([TUNNEL])
    a = ProxyApp(
        ProxySettings(control_plane=f"127.0.0.1:{b.plane.port}", port=0, link_port=0,
                      admin_token=TOKEN),
        peers=MemoryPeers("http://a.invalid", shared),
    )  # fmt: skip
    await a.start()
    yield Pair(a, b)
    await a.stop()
    await close_stack(b)


async def test_a_request_is_relayed_to_the_instance_holding_the_agent(pair: Pair) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(pair.base_a + "/echo?x=1", content=b"hello")
    assert answer.status_code == 200
    assert answer.json()["body"] == "hello"
    assert answer.headers["x-local"] == "yes"
    seen = pair.b.local.seen_headers[-1]
    assert seen["X-Forwarded-For"] == "127.0.0.1"  # the web client's, through the hop
    assert HOP not in seen  # the hop ends at the instance
    assert CLIENT_IP not in seen


async def test_a_relayed_stream_arrives_piece_by_piece(pair: Pair) -> None:
    started = time.monotonic()
    async with (
        httpx.AsyncClient(timeout=30) as client,
        client.stream("GET", pair.base_a + "/api/generate?n=4&every=0.25") as response,
    ):
        assert response.status_code == 200
        arrivals = [time.monotonic() - started async for _ in response.aiter_raw()]
    assert arrivals[0] < 0.25, arrivals
    assert arrivals[-1] - arrivals[0] > 0.5, arrivals


async def test_a_hop_that_cannot_prove_itself_names_no_client(pair: Pair) -> None:
    forged = {HOP: "x" * 32, CLIENT_IP: "203.0.113.7"}
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await client.get(pair.b.base + "/echo", headers=forged)
    assert answer.status_code == 200
    assert pair.b.local.seen_headers[-1]["X-Forwarded-For"] == "127.0.0.1"


async def test_a_relayed_request_is_not_relayed_again(pair: Pair) -> None:
    """The agent left b, which the registry still names (until its holding expires): a
    relays to b, and b, reached through a hop, answers for itself instead of relaying on
    (no loop): 503 NO_AGENT once its short wait for a lane is over."""
    await pair.b.agent.stop()
    await eventually(lambda: not pair.b.proxy.registry.linked(TUNNEL))
    pair.b.proxy.web.configure(replace_claim_wait(pair.b.proxy, 0.2))
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await client.get(pair.base_a + "/echo")
    assert answer.status_code == 503
    assert answer.json()["error"]["reason"] == "NO_AGENT"


def replace_claim_wait(app: ProxyApp, wait: float) -> WebSettings:
    return replace(app.web.settings, claim_wait=wait)


@pytest.mark.skipif(not reachable(REDIS_URL, 6379), reason="needs Redis (required in CI)")
async def test_the_registry_in_redis_publishes_expires_and_withdraws() -> None:
    prefix = redis_prefix()
    one = RedisPeers(redis.Redis.from_url(REDIS_URL), "http://one:1", prefix)
    two = RedisPeers(redis.Redis.from_url(REDIS_URL), "http://two:2", prefix)
    try:
        await one.publish(["users/u/tunnels/a", "users/u/tunnels/b"])
        await two.publish(["users/u/tunnels/a"])
        assert await two.holders("users/u/tunnels/a") == ["http://one:1"]
        assert sorted(await one.holders("users/u/tunnels/a")) == ["http://two:2"]
        assert await two.holders("users/u/tunnels/b") == ["http://one:1"]
        await one.publish(["users/u/tunnels/a"])  # b no longer held by one
        assert await two.holders("users/u/tunnels/b") == []
        raw = redis.Redis.from_url(REDIS_URL)
        key = f"{prefix}proxy:lanes:users/u/tunnels/a"
        await raw.zadd(key, {"http://stale:3": time.time() - 1})  # expired
        assert await two.holders("users/u/tunnels/a") == ["http://one:1"]
        assert await raw.ttl(key) > 0  # the key itself goes away when nobody renews it
        await raw.aclose()
    finally:
        await one.close()
        await two.close()
    check = RedisPeers(redis.Redis.from_url(REDIS_URL), "http://three:3", prefix)
    assert await check.holders("users/u/tunnels/a") == []  # both withdrew on closing
    await check.close()
