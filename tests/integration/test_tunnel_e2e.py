"""Tunnels end to end with real processes and real sockets: the reference agent relaying
bytes to a local echo server, endpoint failover and failback, and a watch that crosses
server replicas."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from tunnelplane.v1 import agents_pb2, tunnels_pb2

from server.app import App
from server.domain.identity.model import Tier
from server.settings import Settings
from tests.conftest import REDIS_URL, Backend, migrate, own_database, require_redis
from tests.helpers import Client, TestUser, Watch, bearer, eventually, state_is
from tests.processes import ROOT, replica_envs, serving

pytestmark = pytest.mark.slow
P = tunnels_pb2
W = P.WatchTunnelsResponse


# --- local services ---------------------------------------------------------------------


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[int]:
    """A TCP echo server on loopback; yields its port."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


class HttpService:
    """A minimal HTTP service answering 200 that can be stopped and started on its port."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

        self._server = await asyncio.start_server(answer, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/health"


# --- the reference agent ----------------------------------------------------------------


async def start_agent(port: int, key: str, tunnel: str) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TP_")}
    env["TP_AGENT_KEY"] = key
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent",
        "--control-plane", f"127.0.0.1:{port}",
        "--tunnel", tunnel,
        "--agent-id", "e2e",
        "--heartbeat", "1",
        "--report-interval", "0.2",
        cwd=ROOT, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def usage_bytes(client: Client, owner: TestUser, name: str, at_least: int) -> P.TunnelUsage:
    """The tunnel's usage once the agent's report of ``at_least`` bytes has arrived."""

    async def reported() -> P.TunnelUsage | None:
        usage = await client.tunnels.GetTunnelUsage(
            P.GetTunnelUsageRequest(name=f"{name}/usage"), metadata=owner.metadata
        )
        return usage if usage.total.bytes_in >= at_least else None

    return await eventually(reported, within=20, every=0.1)


async def test_reference_agent_relays_bytes_counts_usage_and_follows_restarts(
    client: Client,
) -> None:
    owner = await client.new_user()
    async with echo_server() as echo_port:
        made = await client.tunnel(
            owner, endpoints=[P.TunnelEndpoint(url=f"tcp://127.0.0.1:{echo_port}")]
        )
        watch = Watch(client.tunnels, made.name, owner.metadata)
        key = await client.api_key(owner, ["agent.connect"])
        await client.tunnels.StartTunnel(
            P.StartTunnelRequest(name=made.name), metadata=owner.metadata
        )
        await watch.until(state_is(P.Tunnel.STATE_CONNECTING))
        agent = await start_agent(client.app.grpc_port, key, made.name)
        try:
            await watch.until(state_is(P.Tunnel.STATE_CONNECTED))
            host, port = made.listen_address.rsplit(":", 1)
            reader, writer = await relay_connection(host, int(port))
            payload = b"hello through the tunnel\n" * 100
            writer.write(payload)
            await writer.drain()
            assert await asyncio.wait_for(reader.readexactly(len(payload)), 10) == payload
            writer.close()
            await writer.wait_closed()
            usage = await usage_bytes(client, owner, made.name, len(payload))
            assert usage.total.bytes_out >= len(payload)
            assert usage.total.connections >= 1

            agent.kill()  # no goodbye: the server notices the stream break
            await agent.wait()
            gone = await watch.until(state_is(P.Tunnel.STATE_DISCONNECTED))
            assert gone.tunnel.health == P.Tunnel.HEALTH_DOWN

            agent = await start_agent(client.app.grpc_port, key, made.name)
            watch.seen.clear()
            await watch.until(state_is(P.Tunnel.STATE_CONNECTED))
        finally:
            agent.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(agent.communicate(), 20)
            watch.close()
        assert key.encode() not in stderr


async def relay_connection(host: str, port: int) -> tuple[Any, Any]:
    """Connect to the agent's listener (it opens right after the desired state arrives)."""

    async def connected() -> tuple[Any, Any] | None:
        try:
            return await asyncio.open_connection(host, port)
        except OSError:
            return None

    return await eventually(connected, within=5, every=0.05)


# --- failover ---------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def probing(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[App]:
    """A server probing endpoints every 0.5 s (a probe may take 0.4 s on a busy machine), on
    a database of its own: the shared server's prober would claim these endpoints too."""
    directory = tmp_path_factory.mktemp("probing")
    async with own_database(backend, directory) as isolated:
        server = App(isolated.settings(directory, probe_interval=0.5, probe_timeout=0.4))
        await server.start()
        yield server
        await server.stop(grace=0)


async def test_failover_to_the_secondary_and_back_and_the_agent_follows(probing: App) -> None:
    primary, secondary = HttpService(), HttpService()
    await primary.start()
    await secondary.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{probing.grpc_port}") as channel:
        client = Client(probing, channel)
        owner = await client.new_user(tier=Tier.PREMIUM)
        made = await client.tunnel(
            owner,
            endpoints=[
                P.TunnelEndpoint(url=primary.url, priority=0),
                P.TunnelEndpoint(url=secondary.url, priority=1),
            ],
        )
        watch = Watch(client.tunnels, made.name, owner.metadata)
        await client.tunnels.StartTunnel(  # only a started tunnel's endpoints are probed
            P.StartTunnelRequest(name=made.name), metadata=owner.metadata
        )
        agent = client.agents.Connect(
            metadata=bearer(await client.api_key(owner, ["agent.connect"]))
        )
        await agent.write(
            agents_pb2.ConnectRequest(hello=agents_pb2.AgentHello(tunnel=made.name, agent_id="a"))
        )
        try:
            healthy = await watch.until(
                lambda m: (
                    all(e.health == P.TunnelEndpoint.HEALTH_HEALTHY for e in m.tunnel.endpoints)
                    and len(m.tunnel.endpoints) == 2
                )
            )
            assert healthy.tunnel.active_endpoint == primary.url

            await primary.stop()
            moved = await watch.until(lambda m: m.event_type == "tunnel.failover")
            assert moved.tunnel.active_endpoint == secondary.url
            assert await desired_target(agent, secondary.port)

            await primary.start()  # same port
            back = await watch.until(
                lambda m: (
                    m.event_type == "tunnel.failover" and m.tunnel.active_endpoint == primary.url
                )
            )
            assert back.tunnel.endpoints[0].health == P.TunnelEndpoint.HEALTH_HEALTHY
            assert await desired_target(agent, primary.port)
        finally:
            agent.cancel()
            watch.close()
            await primary.stop()
            await secondary.stop()


async def desired_target(agent: Any, port: int) -> bool:
    """Read the agent's stream until a desired state targets ``port``."""
    async with asyncio.timeout(20):
        while True:
            message = await agent.read()
            kind = message.WhichOneof("kind")
            if kind == "desired_state" and message.desired_state.target == f"127.0.0.1:{port}":
                return True


# --- replicas ---------------------------------------------------------------------------


async def test_a_watcher_on_one_replica_sees_changes_made_through_another(
    postgres_database: str, tmp_path: Path
) -> None:
    require_redis()
    await migrate(postgres_database)
    env_a, env_b = replica_envs(postgres_database, REDIS_URL, tmp_path)
    async with serving(env_a) as a, serving(env_b) as b:
        app = App(Settings.from_env(env_a))  # for the client's helpers only; never started
        try:
            async with (
                grpc.aio.insecure_channel(f"127.0.0.1:{a.grpc_port}") as channel_a,
                grpc.aio.insecure_channel(f"127.0.0.1:{b.grpc_port}") as channel_b,
            ):
                on_a, on_b = Client(app, channel_a), Client(app, channel_b)
                owner = await on_a.new_user()
                watch = Watch(on_b.tunnels, owner.name, owner.metadata)
                await watch.until(lambda m: m.kind == W.KIND_SYNCED)
                made = await on_a.tunnel(owner, "made-on-a")
                seen = await watch.until(lambda m: m.tunnel.name == made.name)
                assert seen.event_type == "tunnel.created"
                await on_a.tunnels.StartTunnel(
                    P.StartTunnelRequest(name=made.name), metadata=owner.metadata
                )
                await watch.until(state_is(P.Tunnel.STATE_CONNECTING))
                watch.close()
        finally:
            await app.close()
