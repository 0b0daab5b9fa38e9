"""A server process that stops while an agent is connected: it tells the agent to go away
and exits well within its shutdown grace; the agent reconnects to the other replica behind
the same address, and a connection it relays stays open throughout."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
import pytest
from tunnelplane.v1 import events_pb2, tunnels_pb2

from server.app import App
from server.settings import Settings
from tests.agent.fakes import EchoServer, connect, reference_agent, round_trip
from tests.conftest import REDIS_URL, migrate, require_redis
from tests.helpers import Client, eventually
from tests.processes import replica_envs, serving
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.slow
P = tunnels_pb2
#: Generous: the shutdown grace is 10 s, and a stop used to wait all of it for agents.
STOP_WITHIN = 3.0


class Balancer(TcpProxy):
    """A TCP load balancer on loopback: each new connection goes to the first of its
    upstream ports; removing one (as Kubernetes does with a terminating pod) sends new
    connections elsewhere while open ones stay."""

    def __init__(self, upstreams: list[int]) -> None:
        super().__init__("127.0.0.1", upstreams[0])
        self.upstreams = list(upstreams)
        self.routed: list[int] = []

    def upstream(self) -> tuple[str, int]:
        self.routed.append(self.upstreams[0])
        return "127.0.0.1", self.upstreams[0]


async def test_sigterm_sends_the_agent_to_another_replica_at_once(
    postgres_database: str, tmp_path: Path
) -> None:
    require_redis()
    await migrate(postgres_database)
    env_a, env_b = replica_envs(postgres_database, REDIS_URL, tmp_path)
    echo = await EchoServer().start()
    loop = asyncio.get_running_loop()
    async with serving(env_a) as a, serving(env_b) as b:
        readers = [asyncio.create_task(s.follow_log()) for s in (a, b)]
        balancer = Balancer([a.grpc_port, b.grpc_port])
        await balancer.start()
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
                async with reference_agent(balancer.port, key, made.name, "survivor") as session:
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
                        await readers[0]  # a's whole log, to its last line
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
            await balancer.cut()
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
