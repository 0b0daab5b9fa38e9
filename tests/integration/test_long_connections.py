"""A relayed connection that outlives many report intervals (an LLM token stream, a
keep-alive client), through the reference agent's session and relay, against the real
server on both backends: every report is accepted, the tunnel stays connected, and the
traffic is billed once the connection ends."""

from __future__ import annotations

import asyncio

from tunnelplane.v1 import tunnels_pb2

from tests.agent.fakes import EchoServer, connect, reference_agent
from tests.helpers import (
    Client,
    TestUser,
    Watch,
    agent_key,
    eventually,
    refused_reports,
    state_is,
)

P = tunnels_pb2
W = P.WatchTunnelsResponse
#: Report intervals the connection stays open for.
INTERVALS = 4


async def test_a_connection_open_across_report_intervals_is_accepted_and_billed(
    client: Client,
) -> None:
    owner = await client.new_user()
    echo = await EchoServer().start()
    made = await client.tunnel(owner, endpoints=[P.TunnelEndpoint(url=f"tcp://{echo.address}")])
    watch = Watch(client.tunnels, made.name, owner.metadata)
    # Watching before the start: both status changes come after the watch's starting point.
    await watch.until(lambda m: m.kind == P.WatchTunnelsResponse.KIND_SYNCED)
    refused_before = refused_reports(client)
    await client.tunnels.StartTunnel(P.StartTunnelRequest(name=made.name), metadata=owner.metadata)
    sent = 0
    try:
        key = await agent_key(client, owner)
        async with reference_agent(
            client.app.grpc_port, key, made.name, "long-lived", report_interval=0.1
        ) as session:
            await watch.until(state_is(P.Tunnel.STATE_CONNECTED))
            await session.wait_applied(1)
            relay = session.controller.relay
            assert relay is not None
            book = session.reports
            async with connect(relay.port) as (reader, writer):
                for interval in range(INTERVALS):
                    chunk = f"token {interval} ".encode() * 50
                    writer.write(chunk)
                    await writer.drain()
                    assert await asyncio.wait_for(reader.readexactly(len(chunk)), 10) == chunk
                    sent += len(chunk)
                    first = book.next_sequence

                    async def acknowledged(first: int = first) -> bool:
                        return book.next_sequence > first and not book.pending

                    await eventually(acknowledged)  # a report made while the stream is open
            await relay.wait_until_idle()
            traffic = await billed(client, owner, made.name, requests=1)
            assert book.refused == 0
            assert session.welcomes == 1  # never dropped, never reconnected
            assert book.next_sequence > INTERVALS + 1
            tunnel = await client.tunnels.GetTunnel(
                P.GetTunnelRequest(name=made.name), metadata=owner.metadata
            )
    finally:
        watch.close()
        await echo.close()

    assert refused_reports(client) == refused_before
    assert (tunnel.state, tunnel.connected_agents) == (P.Tunnel.STATE_CONNECTED, 1)
    changes = [m.tunnel.state for m in watch.seen if m.event_type == "tunnel.status_changed"]
    # Two changes, the tunnel as it is when each is sent: the first may already be connected.
    assert len(changes) == 2
    assert changes[0] in {P.Tunnel.STATE_CONNECTING, P.Tunnel.STATE_CONNECTED}
    assert changes[1] == P.Tunnel.STATE_CONNECTED
    assert (traffic.request_count, traffic.success_count, traffic.connection_count) == (1, 1, 1)
    assert traffic.bytes_in == traffic.bytes_out == sent
    assert traffic.HasField("latency_p50")
    totals = await client.app.tunnels.agents.traffic(
        await client.app.tunnels.tunnels.get(owner.id, made.name.rsplit("/", 1)[1])
    )
    assert sum(totals.totals.latency_buckets) == 1  # the connection's one latency
    usage = await client.tunnels.GetTunnelUsage(
        P.GetTunnelUsageRequest(name=f"{made.name}/usage"), metadata=owner.metadata
    )
    assert (usage.total.connections, usage.total.bytes_in, usage.total.bytes_out) == (
        1,
        sent,
        sent,
    )
    assert usage.total.peak_concurrency == 1


async def billed(client: Client, owner: TestUser, name: str, *, requests: int) -> P.TunnelMetrics:
    """The tunnel's metrics, once ``requests`` requests are counted."""
    found = P.TunnelMetrics()

    async def counted() -> bool:
        nonlocal found
        found = await client.tunnels.GetTunnelMetrics(
            P.GetTunnelMetricsRequest(name=f"{name}/metrics"), metadata=owner.metadata
        )
        return found.request_count >= requests

    await eventually(counted)
    return found
