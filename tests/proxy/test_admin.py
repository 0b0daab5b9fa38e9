"""An instance's admin side and what a pushed config changes, with the whole path real:
the admin token, health with load, stats, diagnostics, a config applied from the next
request (concurrency and rate limits, gzip that streams), a bad config refused, and an
instance that serves one user's tunnels only."""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

import httpx
import pytest
import pytest_asyncio

from proxy.web import WebSettings
from tests.helpers import eventually
from tests.proxy.conftest import Stack, close_stack, open_stack

TOKEN = "t" * 32
#: The control plane's defaults (server/domain/proxies/model.py ProxyConfig), as pushed.
CONFIG: dict[str, Any] = {
    "max_connections": 100, "timeout": 30.0, "first_byte_timeout": 300.0, "gzip_level": 6,
    "rate_limit_rps": 1000, "rate_limit_burst": 100, "retries": 3, "retry_delay": 1.0,
    "max_body_bytes": 100 * 1024 * 1024,
}  # fmt: skip


@pytest_asyncio.fixture
async def managed() -> AsyncIterator[Stack]:
    opened = await open_stack(admin_token=TOKEN)
    yield opened
    await close_stack(opened)


def admin(stack: Stack, token: str = TOKEN) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{stack.proxy.admin_port}",
                             headers=headers, timeout=10)  # fmt: skip


async def push(stack: Stack, version: int, **changes: Any) -> httpx.Response:
    async with admin(stack) as client:
        return await client.put("/_proxy/config", json={"version": version,
                                                        "config": CONFIG | changes})  # fmt: skip


async def test_the_admin_side_needs_its_token_but_a_probe_learns_it_is_alive(
    managed: Stack,
) -> None:
    async with admin(managed, token="") as anonymous:
        bare = await anonymous.get("/_proxy/health")
        assert (bare.status_code, bare.json()) == (200, {"status": "SERVING"})
        assert (await anonymous.get("/_proxy/diagnostics")).status_code == 401
        assert (await anonymous.put("/_proxy/config", json={})).status_code == 401
        assert (await anonymous.get("/metrics")).status_code == 200
    async with admin(managed, token="x" * 32) as wrong:
        assert (await wrong.get("/_proxy/stats")).status_code == 401
    await managed.client.get(managed.base + "/echo")
    async with admin(managed) as client:
        health = (await client.get("/_proxy/health")).json()
        assert health["status"] == "SERVING"
        assert health["last_request_time"] > time.time() - 60
        assert {"cpu_percent", "streams", "config_version"} <= set(health)
        stats = (await client.get("/_proxy/stats")).json()
        assert stats["requests_by_class"]["2xx"] >= 1
        assert (await client.get("/nothing")).status_code == 404


async def test_a_pushed_config_limits_concurrency_and_rate_from_the_next_request(
    managed: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tunnelplane.proxy")
    answer = await push(managed, 2, max_connections=1)
    assert (answer.status_code, answer.json()) == (200, {"config_version": 2})
    hanging = asyncio.create_task(managed.client.get(managed.base + "/hang"))
    await managed.local.started.wait()
    busy = await managed.client.get(managed.base + "/echo")
    assert busy.status_code == 503
    assert busy.json()["error"]["reason"] == "TOO_MANY_CONNECTIONS"
    hanging.cancel()
    await asyncio.gather(hanging, return_exceptions=True)
    await eventually(lambda: managed.proxy.web.active == 0)
    await push(managed, 3, rate_limit_rps=1, rate_limit_burst=1)
    assert (await managed.client.get(managed.base + "/echo")).status_code == 200
    limited = await managed.client.get(managed.base + "/echo")
    assert limited.status_code == 429
    assert limited.headers["Retry-After"] == "1"
    async with admin(managed) as client:
        diagnostics = (await client.get("/_proxy/diagnostics")).json()
    assert diagnostics["config_version"] == 3
    assert diagnostics["config"]["rate_limit_rps"] == 1
    assert any(line["message"] == "config applied" for line in diagnostics["recent_logs"])


async def test_a_bad_config_is_refused_and_the_old_one_stays(managed: Stack) -> None:
    before = managed.proxy.web.settings
    for bad in ({"timeout": 0}, {"gzip_level": 12}, {"max_connections": "many"},
                {"retries": True}):  # fmt: skip
        answer = await push(managed, 9, **bad)
        assert answer.status_code == 400, bad
    async with admin(managed) as client:
        garbage = await client.put("/_proxy/config", content=b"{not json")
        assert garbage.status_code == 400
    assert managed.proxy.web.settings == before


async def test_gzip_streams_piece_by_piece(managed: Stack) -> None:
    await push(managed, 2, gzip_level=6)
    reader = zlib.decompressobj(31)
    arrivals: list[float] = []
    started = time.monotonic()
    headers = {"Accept-Encoding": "gzip"}
    url = managed.base + "/api/generate?n=4&every=0.2"
    async with managed.client.stream("GET", url, headers=headers) as response:
        assert response.headers["content-encoding"] == "gzip"
        decoded = b""
        async for raw in response.aiter_raw():
            piece = reader.decompress(raw)
            if piece:
                arrivals.append(time.monotonic() - started)
            decoded += piece
    assert decoded.count(b"\n") == 5  # four tokens and the end
    assert arrivals[0] < 0.2, arrivals  # the first token was not held back for the rest
    assert arrivals[-1] - arrivals[0] > 0.4, arrivals


async def test_an_instance_of_one_user_serves_no_other_users_tunnel() -> None:
    opened = await open_stack(web=WebSettings(owner="usr_01jd3k0000000000000000000z"))
    try:
        answer = await opened.client.get(opened.base + "/echo")
        assert answer.status_code == 404
        assert answer.json()["error"]["reason"] == "NO_SUCH_TUNNEL"
        assert opened.local.seen_headers == []
    finally:
        await close_stack(opened)
    mine = await open_stack(web=WebSettings(owner="usr_01jd3k0000000000000000000u"))
    try:
        assert (await mine.client.get(mine.base + "/echo")).status_code == 200
    finally:
        await close_stack(mine)


def test_the_pushed_shape_is_the_control_planes() -> None:
    from server.domain.proxies.model import ProxyConfig

    pushed = asdict(ProxyConfig())
    assert {k: pushed[k] for k in CONFIG} == CONFIG
