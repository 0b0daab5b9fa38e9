"""What a tunnel says about itself as it is started, carried and stopped, on both backends
and (where the API shows it) both transports: its health before any agent, why it
stopped, which endpoints are probed, failover with nowhere to go, and how a stop drains
the agent's open connections."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
from tunnelplane.v1 import events_pb2, tunnels_pb2

from server.app import App
from tests.agent.fakes import EchoServer, closed_by_peer, connect, reference_agent, round_trip
from tests.conftest import Backend, own_server
from tests.helpers import (
    Agent,
    Client,
    TestUser,
    Watch,
    agent_key,
    client_of,
    eventually,
    http_of,
    state_is,
)

P = tunnels_pb2
T = P.Tunnel
#: How long a stopped tunnel's open connections go on, on this module's server.
STOP_GRACE = 1.0


@pytest_asyncio.fixture(scope="module")
async def server(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[App]:
    """A server probing every 0.5 s and giving stopped tunnels' connections 1 s, on a
    database of its own (the shared server's prober would claim these endpoints too)."""
    async with own_server(
        backend,
        tmp_path_factory.mktemp("lifecycle"),
        probe_interval=0.5,
        probe_timeout=0.4,
        tunnel_stop_grace=STOP_GRACE,
    ) as app:
        yield app


@pytest_asyncio.fixture
async def client(server: App) -> AsyncIterator[Client]:
    async with client_of(server) as made:
        yield made


@pytest_asyncio.fixture
async def http(server: App) -> AsyncIterator[httpx.AsyncClient]:
    async with http_of(server) as web:
        yield web


class CountingService:
    """An HTTP service answering 200 that counts the requests (probes) it gets."""

    def __init__(self) -> None:
        self.requests = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> CountingService:
        self._server = await asyncio.start_server(self._answer, "127.0.0.1", 0)
        return self

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        writer.close()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/health"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


@pytest_asyncio.fixture
async def services() -> AsyncIterator[list[CountingService]]:
    made = [await CountingService().start() for _ in range(2)]
    yield made
    for service in made:
        await service.close()


async def get(client: Client, owner: TestUser, name: str) -> T:
    return await client.tunnels.GetTunnel(P.GetTunnelRequest(name=name), metadata=owner.metadata)


async def start(client: Client, owner: TestUser, name: str) -> T:
    return await client.tunnels.StartTunnel(
        P.StartTunnelRequest(name=name), metadata=owner.metadata
    )


async def stop(client: Client, owner: TestUser, name: str) -> T:
    return await client.tunnels.StopTunnel(P.StopTunnelRequest(name=name), metadata=owner.metadata)


def auth(owner: TestUser) -> dict[str, str]:
    return {"authorization": f"Bearer {owner.access_token}"}


# --- health before any agent ------------------------------------------------------------


async def test_a_started_tunnel_without_an_agent_is_of_unknown_health(
    client: Client, http: httpx.AsyncClient, services: list[CountingService]
) -> None:
    owner = await client.new_user()
    made = await client.tunnel(owner, endpoints=[P.TunnelEndpoint(url=services[0].url)])
    watch = Watch(client.tunnels, made.name, owner.metadata)
    try:
        await start(client, owner, made.name)
        probed = await watch.until(
            lambda m: [e.health for e in m.tunnel.endpoints] == [P.TunnelEndpoint.HEALTH_HEALTHY]
        )
        assert probed.tunnel.health == T.HEALTH_UNKNOWN  # healthy endpoints, but no agent
        assert (await get(client, owner, made.name)).health == T.HEALTH_UNKNOWN
        web = await http.get(f"/v1/{made.name}", headers=auth(owner))
        assert (web.json()["state"], web.json()["health"]) == ("STATE_CONNECTING", "HEALTH_UNKNOWN")

        agent = Agent(client.agents, await agent_key(client, owner), made.name)
        await agent.hello()
        carried = await watch.until(lambda m: m.tunnel.health == T.HEALTH_HEALTHY)
        assert carried.tunnel.state == T.STATE_CONNECTED
        agent.stream.cancel()
    finally:
        watch.close()


# --- why a tunnel is not carrying -------------------------------------------------------


async def test_a_stopped_tunnel_says_why_and_a_start_clears_it(
    client: Client, http: httpx.AsyncClient
) -> None:
    owner = await client.new_user()
    made = await client.tunnel(owner)
    watch = Watch(client.tunnels, made.name, owner.metadata)
    try:
        assert (await start(client, owner, made.name)).state_reason == ""
        stopped = await stop(client, owner, made.name)
        assert (stopped.state, stopped.state_reason) == (
            T.STATE_DISCONNECTED,
            "stopped by the owner",
        )
        web = await http.get(f"/v1/{made.name}", headers=auth(owner))
        assert web.json()["stateReason"] == "stopped by the owner"
        event = await watch.until(state_is(T.STATE_DISCONNECTED))
        assert event.tunnel.state_reason == "stopped by the owner"

        restarted = await http.post(f"/v1/{made.name}:start", json={}, headers=auth(owner))
        assert restarted.json()["state"] == "STATE_CONNECTING"
        assert restarted.json().get("stateReason", "") == ""

        agent = Agent(client.agents, await agent_key(client, owner), made.name)
        await agent.hello()
        await watch.until(state_is(T.STATE_CONNECTED))
        watch.seen.clear()
        await agent.leave()
        left = await watch.until(state_is(T.STATE_DISCONNECTED))
        assert left.tunnel.state_reason == "the last agent disconnected"
        assert (await get(client, owner, made.name)).state_reason == "the last agent disconnected"
    finally:
        watch.close()


# --- probes -----------------------------------------------------------------------------


async def test_endpoints_of_tunnels_not_started_are_not_probed(
    client: Client, services: list[CountingService]
) -> None:
    idle, busy = services
    owner = await client.new_user()
    resting = await client.tunnel(owner, endpoints=[P.TunnelEndpoint(url=idle.url)])
    working = await client.tunnel(owner, endpoints=[P.TunnelEndpoint(url=busy.url)])
    await start(client, owner, working.name)
    # Both endpoints were due from the start: two rounds of probes later, only the
    # started tunnel's was probed.
    await eventually(lambda: busy.requests >= 2)
    assert idle.requests == 0
    assert (await get(client, owner, resting.name)).endpoints[0].health == (
        P.TunnelEndpoint.HEALTH_UNKNOWN
    )

    await stop(client, owner, working.name)
    at_stop = busy.requests
    await start(client, owner, resting.name)
    await eventually(lambda: idle.requests >= 2)
    assert busy.requests <= at_stop + 1  # at most a probe already under way at the stop


# --- failover with nowhere to go --------------------------------------------------------


async def test_losing_the_only_endpoint_is_no_failover(client: Client) -> None:
    only = await CountingService().start()
    owner = await client.new_user()
    made = await client.tunnel(owner, endpoints=[P.TunnelEndpoint(url=only.url)])
    watch = Watch(client.tunnels, made.name, owner.metadata)
    agent = Agent(client.agents, await agent_key(client, owner), made.name)
    try:
        await start(client, owner, made.name)
        await agent.hello()
        await watch.until(lambda m: m.tunnel.health == T.HEALTH_HEALTHY)
        await only.close()
        down = await watch.until(lambda m: m.tunnel.health == T.HEALTH_DOWN)
        assert down.event_type == "tunnel.health_changed"
        assert down.tunnel.active_endpoint == ""
    finally:
        agent.stream.cancel()
        watch.close()
        await only.close()
    assert "tunnel.failover" not in {m.event_type for m in watch.seen}
    logged = await client.events.ListEvents(
        events_pb2.ListEventsRequest(
            parent="users/me", filter=f'subject = "{made.name}"', page_size=1000
        ),
        metadata=owner.metadata,
    )
    types = [e.type for e in logged.events]
    assert "tunnel.health_changed" in types
    assert "tunnel.failover" not in types


# --- a stop drains the agent's connections ----------------------------------------------


async def test_stop_refuses_new_connections_and_closes_open_ones_after_the_grace(
    client: Client,
) -> None:
    echo = await EchoServer().start()
    owner = await client.new_user()
    made = await client.tunnel(owner, endpoints=[P.TunnelEndpoint(url=f"tcp://{echo.address}")])
    await start(client, owner, made.name)
    loop = asyncio.get_running_loop()
    try:
        key = await agent_key(client, owner)
        async with reference_agent(client.app.grpc_port, key, made.name, "drained") as session:
            await session.wait_applied(1)
            relay = session.controller.relay
            assert relay is not None
            port = relay.port
            async with connect(port) as (reader, writer):
                assert await round_trip(reader, writer, b"before") == b"before"
                await stop(client, owner, made.name)
                stopped = loop.time()
                await eventually(lambda: session.controller.relay is None)
                with pytest.raises(ConnectionRefusedError):
                    async with connect(port):
                        pass
                assert await round_trip(reader, writer, b"in the grace") == b"in the grace"
                assert await closed_by_peer(reader)
                lasted = loop.time() - stopped
    finally:
        await echo.close()
    assert STOP_GRACE - 0.05 <= lasted < STOP_GRACE + 4
