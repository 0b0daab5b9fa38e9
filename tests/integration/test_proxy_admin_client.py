"""The control plane's client of proxies' admin sides, against a real HTTP server on
loopback: callers' reads are tried twice (tenacity, full jitter) and go through a
circuit breaker per instance, which fails them at once when the instance stopped
answering; the fleet loop's health checks and config pushes bypass both."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from server.domain.proxies.model import ProxyState
from server.provision.admin import READ_ATTEMPTS, AdminError, InstanceAdminClient
from server.resilience.breakers import BreakerKind, Breakers
from tests.unit.test_proxy_fleet_rules import instance, proxy

THRESHOLD = 2


class Admin:
    """An instance's admin side that answers 503 (or 200 once ``healthy``)."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.healthy = False
        #: Answer 503 this many times, then heal.
        self.failures_left = -1
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.hits.append(request.path)
        if self.failures_left >= 0:
            self.healthy = self.failures_left == 0
            self.failures_left = max(0, self.failures_left - 1)
        if self.healthy:
            return web.json_response({"status": "SERVING"})
        return web.Response(status=503)


@pytest.fixture
async def admin() -> AsyncIterator[Admin]:
    side = Admin()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", side.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    side.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield side
    finally:
        await runner.cleanup()


async def test_reads_retry_then_the_breaker_fails_them_at_once(admin: Admin) -> None:
    breakers = Breakers({"proxy-admin": BreakerKind(THRESHOLD, 60.0)}, CollectorRegistry())
    client = InstanceAdminClient(lambda _: "token", timeout=2.0, breakers=breakers)
    target = proxy(ProxyState.RUNNING)
    there = instance(admin_url=f"http://127.0.0.1:{admin.port}")
    try:
        for _ in range(THRESHOLD):
            with pytest.raises(AdminError, match="503"):
                await client.get(target, there, "/_proxy/traffic", 2.0)
        assert len(admin.hits) == THRESHOLD * READ_ATTEMPTS  # each read tried twice
        (state,) = breakers.states()
        assert (state.name, state.state) == (f"proxy-admin.{there.id}", "opened")

        with pytest.raises(AdminError, match="circuit breaker open"):
            await client.get(target, there, "/_proxy/diagnostics", 2.0)
        assert len(admin.hits) == THRESHOLD * READ_ATTEMPTS  # not asked at all

        # The fleet's health check is the probe: it still reaches the instance.
        admin.healthy = True
        assert (await client.get(target, there, "/_proxy/health", 2.0))["status"] == "SERVING"
        assert admin.hits[-1] == "/_proxy/health"

        await breakers.reset(f"proxy-admin.{there.id}")
        assert (await client.get(target, there, "/_proxy/traffic", 2.0))["status"] == "SERVING"
    finally:
        await client.close()


async def test_a_read_that_succeeds_on_its_second_try_counts_no_failure(admin: Admin) -> None:
    breakers = Breakers({"proxy-admin": BreakerKind(1, 60.0)}, CollectorRegistry())
    client = InstanceAdminClient(lambda _: "token", timeout=2.0, breakers=breakers)
    target = proxy(ProxyState.RUNNING)
    there = instance(admin_url=f"http://127.0.0.1:{admin.port}")
    admin.failures_left = 1
    try:
        assert (await client.get(target, there, "/_proxy/traffic", 2.0))["status"] == "SERVING"
        assert len(admin.hits) == 2
        assert breakers.states() == []  # a threshold of one, and still closed
    finally:
        await client.close()
