"""A server process that stops while an agent is connected: it tells the agent to go away
and exits well within its shutdown grace; the agent reconnects to the other replica behind
the same address, and a connection it relays stays open throughout."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from tunnelplane.v1 import events_pb2, tunnels_pb2

from agent.session import Session, SessionSettings
from server.app import App
from server.settings import Settings
from tests.agent.fakes import EchoServer, connect, round_trip
from tests.conftest import REDIS_URL, migrate, require_redis
from tests.helpers import Client
from tests.processes import ServerProcess, replica_envs, serving

pytestmark = pytest.mark.slow
P = tunnels_pb2
#: Generous: the shutdown grace is 10 s, and a stop used to wait all of it for agents.
STOP_WITHIN = 3.0


class Balancer:
    """A TCP load balancer on loopback: each new connection goes to the first of its
    upstream ports; removing one (as Kubernetes does with a terminating pod) sends new
    connections elsewhere while open ones stay."""

    def __init__(self, upstreams: list[int]) -> None:
        self.upstreams = list(upstreams)
        self.routed: list[int] = []
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> Balancer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = self.upstreams[0]
        self.routed.append(upstream)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream)
        except OSError:
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._pipes.add(task)
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            self._pipes.discard(task)
            for w in (writer, up_writer):
                w.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError):
        writer.write_eof()


async def read_log(server: ServerProcess) -> None:
    """Keep reading a server's log (a full pipe would block it)."""
    assert server.process.stderr is not None
    while line := await server.process.stderr.readline():
        server.log.append(json.loads(line))


async def eventually(check: Callable[[], bool], within: float = 20) -> None:
    """Poll ``check`` (the agent's own state announces nothing) until it holds."""
    async with asyncio.timeout(within):
        while not check():  # noqa: ASYNC110 - nothing to await
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def agent_via(port: int, key: str, tunnel: str) -> AsyncIterator[Session]:
    """The reference agent's session, in this process, through ``port``."""
    session = Session(
        SessionSettings(
            control_plane=f"127.0.0.1:{port}",
            tunnel=tunnel,
            agent_id="survivor",
            key=key,
            heartbeat_interval=1.0,
            report_interval=0.2,
        )
    )
    running = asyncio.create_task(session.run())
    try:
        yield session
    finally:
        session.stop()
        async with asyncio.timeout(10):
            await running


async def test_sigterm_sends_the_agent_to_another_replica_at_once(
    postgres_database: str, tmp_path: Path
) -> None:
    require_redis()
    await migrate(postgres_database)
    env_a, env_b = replica_envs(postgres_database, REDIS_URL, tmp_path)
    echo = await EchoServer().start()
    loop = asyncio.get_running_loop()
    async with serving(env_a) as a, serving(env_b) as b:
        readers = [asyncio.create_task(read_log(s)) for s in (a, b)]
        balancer = await Balancer([a.grpc_port, b.grpc_port]).start()
        app = App(Settings.from_env(env_b))  # for the client's helpers only; never started
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{b.grpc_port}") as channel:
                client = Client(app, channel)
                owner = await client.new_user()
                made = await client.tunnel(
                    owner, endpoints=[P.TunnelEndpoint(url=f"tcp://{echo.address}")]
                )
                await client.tunnels.StartTunnel(
                    P.StartTunnelRequest(name=made.name), metadata=owner.metadata
                )
                key = await client.api_key(owner, ["agent.connect"])
                async with agent_via(balancer.port, key, made.name) as session:
                    await session.wait_applied(1)
                    relay = session.controller.relay
                    assert relay is not None
                    assert balancer.routed == [a.grpc_port]
                    async with connect(relay.port) as (reader, writer):
                        assert await round_trip(reader, writer, b"via a") == b"via a"

                        balancer.upstreams.remove(a.grpc_port)
                        signalled = loop.time()
                        a.process.send_signal(signal.SIGTERM)
                        assert await a.process.wait() == 0
                        stopped_in = loop.time() - signalled
                        await eventually(lambda: session.welcomes == 2)

                        assert await round_trip(reader, writer, b"via b") == b"via b"
                    assert session.controller.relay is relay
                    tunnel = await client.tunnels.GetTunnel(
                        P.GetTunnelRequest(name=made.name), metadata=owner.metadata
                    )
                logged = await client.events.ListEvents(
                    events_pb2.ListEventsRequest(
                        parent="users/me", filter=f'subject = "{made.name}"', page_size=100
                    ),
                    metadata=owner.metadata,
                )
        finally:
            await app.close()
            await balancer.close()
            await echo.close()
            for task in readers:
                task.cancel()

    assert stopped_in < STOP_WITHIN
    assert balancer.routed[-1] == b.grpc_port
    assert (tunnel.state, tunnel.connected_agents) == (P.Tunnel.STATE_CONNECTED, 1)
    changes = [
        e.payload["to"] for e in reversed(logged.events) if e.type == "tunnel.status_changed"
    ]
    assert changes == ["connecting", "connected"]  # the agent never counted as gone
    messages = [entry.get("message") for entry in a.log]
    assert messages[-1] == "stopped"
