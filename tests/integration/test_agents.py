"""AgentService.Connect against the real server on both backends: the session protocol,
state and health following the agents, idempotent reports, metrics and usage."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from google.type import date_pb2
from tunnelplane.v1 import agents_pb2, agents_pb2_grpc, auth_pb2, tunnels_pb2, users_pb2

from server.app import App
from server.domain.identity.model import Role
from server.domain.identity.tiers import DEFAULT_TIERS
from tests.conftest import Backend, own_database, own_server
from tests.helpers import (
    Agent,
    Client,
    TestUser,
    agent_key,
    bearer,
    client_of,
    detail,
    eventually,
    fails,
    reason,
    refused_reports,
    violations,
)

A = agents_pb2
P = tunnels_pb2
D = A.DesiredState


async def wait_for_state(client: Client, owner: TestUser, name: str, **want: Any) -> P.Tunnel:
    """Poll until the tunnel has ``want`` (state changes land after the stream's calls)."""

    async def reached() -> P.Tunnel | None:
        found = await client.tunnels.GetTunnel(
            P.GetTunnelRequest(name=name), metadata=owner.metadata
        )
        return found if all(getattr(found, k) == v for k, v in want.items()) else None

    return await eventually(reached, within=10, every=0.05)


async def test_session_follows_the_desired_state_and_moves_the_tunnel(client: Client) -> None:
    owner = await client.new_user()
    made = await client.tunnel(owner, endpoints=[P.TunnelEndpoint(url="tcp://127.0.0.1:7")])
    agent = Agent(client.agents, await agent_key(client, owner), made.name)
    welcome = await agent.hello()
    assert welcome.session == f"{made.name}/agents/agent-1"
    assert welcome.heartbeat_interval.seconds == 15
    assert welcome.last_sequence == 0
    first = await agent.desired()
    assert (first.run, first.listen_address) == (D.RUN_STOPPED, made.listen_address)
    assert first.target == "127.0.0.1:7"

    await client.tunnels.StartTunnel(P.StartTunnelRequest(name=made.name), metadata=owner.metadata)
    started = await agent.desired()
    assert started.run == D.RUN_STARTED
    assert started.version > first.version
    connected = await wait_for_state(client, owner, made.name, state=P.Tunnel.STATE_CONNECTED)
    assert (connected.connected_agents, connected.health) == (1, P.Tunnel.HEALTH_UNKNOWN)

    refused = client.tunnels.DeleteTunnel(
        P.DeleteTunnelRequest(name=made.name), metadata=owner.metadata
    )
    assert reason(await fails(refused, grpc.StatusCode.FAILED_PRECONDITION)) == "TUNNEL_CONNECTED"

    await agent.leave()
    gone = await wait_for_state(client, owner, made.name, state=P.Tunnel.STATE_DISCONNECTED)
    assert (gone.connected_agents, gone.lost_agents, gone.health) == (0, 1, P.Tunnel.HEALTH_DOWN)

    again = Agent(client.agents, await agent_key(client, owner), made.name)
    await again.hello()
    assert (await again.desired()).run == D.RUN_STARTED
    await wait_for_state(client, owner, made.name, state=P.Tunnel.STATE_CONNECTED)
    forced = await client.tunnels.DeleteTunnel(
        P.DeleteTunnelRequest(name=made.name, force=True), metadata=owner.metadata
    )
    assert forced.name == made.name
    assert (await again.desired()).run == D.RUN_STOPPED  # the tunnel is gone
    again.stream.cancel()


async def test_reports_count_once_and_feed_metrics_and_usage(client: Client) -> None:
    owner = await client.new_user()
    made = await client.tunnel(owner)
    agent = Agent(client.agents, await agent_key(client, owner), made.name)
    await agent.hello()
    await agent.desired()
    counts = {
        "request_count": 10,
        "success_count": 9,
        "error_count": 1,
        "latency_buckets": [0, 0, 0, 5, 5],  # five ≤ 10 ms, five ≤ 20 ms
        "connections": 10,
        "bytes_in": 1000,
        "bytes_out": 5000,
        "peak_concurrency": 4,
        "active_connections": 2,
        "stream_milliseconds": 45_500,
    }
    assert (await agent.report(1, **counts)).counted
    assert not (await agent.report(1, **counts)).counted  # a re-sent report
    assert (await agent.report(2, **counts)).counted

    metrics = await client.tunnels.GetTunnelMetrics(
        P.GetTunnelMetricsRequest(name=f"{made.name}/metrics"), metadata=owner.metadata
    )
    assert (metrics.request_count, metrics.success_count, metrics.error_count) == (20, 18, 2)
    assert metrics.success_rate == pytest.approx(0.9)
    assert 5_000_000 <= metrics.latency_p50.ToNanoseconds() <= 10_000_000
    assert 10_000_000 <= metrics.latency_p95.ToNanoseconds() <= 20_000_000
    assert (metrics.bytes_in, metrics.bytes_out, metrics.connection_count) == (2000, 10000, 20)
    assert metrics.active_connections == 2

    today = datetime.now(UTC).date()
    usage = await client.tunnels.GetTunnelUsage(
        P.GetTunnelUsageRequest(name=f"{made.name}/usage"), metadata=owner.metadata
    )
    assert [(d.date.year, d.date.month, d.date.day) for d in usage.days] == [
        (today.year, today.month, today.day)
    ]
    assert (usage.total.connections, usage.total.bytes_in, usage.total.peak_concurrency) == (
        20,
        2000,
        4,
    )
    # Requests and how long they were open: counted once, the re-sent report not again.
    assert (usage.total.requests, usage.total.stream_seconds) == (20, 91.0)
    report = await client.tunnels.GetUsageReport(
        P.GetUsageReportRequest(name="users/me/usageReport"), metadata=owner.metadata
    )
    assert [t.tunnel for t in report.tunnels] == [made.name]
    assert report.total.bytes_out == 10000

    welcome = await Agent(client.agents, await agent_key(client, owner), made.name).hello()
    assert welcome.last_sequence == 2  # a reconnect resumes after the last counted report
    agent.stream.cancel()


async def test_usage_dates_are_validated(client: Client) -> None:
    owner = await client.new_user()
    made = await client.tunnel(owner)
    bad = P.GetTunnelUsageRequest(
        name=f"{made.name}/usage", start_date=date_pb2.Date(year=2026, month=2, day=30)
    )
    error = await fails(
        client.tunnels.GetTunnelUsage(bad, metadata=owner.metadata),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "start_date" in violations(error)


async def test_billing_admins_see_usage_per_tier(client: Client) -> None:
    owner = await client.new_user()
    made = await client.tunnel(owner)
    agent = Agent(client.agents, await agent_key(client, owner), made.name)
    await agent.hello()
    await agent.report(1, connections=3, bytes_in=30, bytes_out=60, peak_concurrency=1)
    admin = await client.new_user(role=Role.FINANCE_ADMIN)
    summary = await client.tunnels.SummarizeUsage(
        P.SummarizeUsageRequest(), metadata=admin.metadata
    )
    free = next(t for t in summary.tiers if t.tier == 1)
    assert free.users >= 1
    assert free.total.connections >= 3
    agent.stream.cancel()


async def test_agent_keys_serve_only_their_owner_and_do_nothing_else(client: Client) -> None:
    owner, stranger = await client.new_user(), await client.new_user()
    made = await client.tunnel(owner)
    foreign = Agent(client.agents, await agent_key(client, stranger), made.name)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await foreign.hello()
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    key = await agent_key(client, owner)
    error = await fails(
        client.tunnels.GetTunnel(P.GetTunnelRequest(name=made.name), metadata=bearer(key)),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert reason(error) == "PERMISSION_MISSING"
    full_key = await client.api_key(owner)  # the owner's own permissions: not an agent
    with pytest.raises(grpc.aio.AioRpcError) as not_agent:
        await Agent(client.agents, full_key, made.name).hello()
    assert not_agent.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("first", "field"),
    [
        (A.ConnectRequest(heartbeat=A.AgentHeartbeat()), "hello"),
        (
            A.ConnectRequest(hello=A.AgentHello(tunnel="users/me/tunnels/x", agent_id="a")),
            "hello.tunnel",
        ),
    ],
)
async def test_a_bad_hello_is_refused_naming_the_field(
    client: Client, first: A.ConnectRequest, field: str
) -> None:
    owner = await client.new_user()
    stream = client.agents.Connect(metadata=bearer(await agent_key(client, owner)))
    await stream.write(first)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stream.read()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violations(refused.value)


async def test_a_bad_agent_id_and_a_bad_report_are_refused(client: Client) -> None:
    owner = await client.new_user()
    made = await client.tunnel(owner)
    key = await agent_key(client, owner)
    with pytest.raises(grpc.aio.AioRpcError) as bad_id:
        await Agent(client.agents, key, made.name, agent_id="no spaces/please").hello()
    assert "hello.agent_id" in violations(bad_id.value)


async def test_a_bad_report_is_refused_and_the_session_goes_on(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    owner = await client.new_user()
    made = await client.tunnel(owner)
    await client.tunnels.StartTunnel(P.StartTunnelRequest(name=made.name), metadata=owner.metadata)
    key = await agent_key(client, owner)
    agent = Agent(client.agents, key, made.name)
    await agent.hello()
    await wait_for_state(client, owner, made.name, state=P.Tunnel.STATE_CONNECTED)
    refused_before = refused_reports(client)

    # What the agent used to send mid-connection: a latency whose request is not counted yet.
    bad = await agent.report(1, connections=1, latency_buckets=[0, 1], peak_concurrency=1)
    assert (bad.sequence, bad.counted, bad.refused) == (1, False, True)
    assert "report.latency_buckets" in bad.refusal
    assert refused_reports(client) == refused_before + 1
    [logged] = [r for r in caplog.records if r.getMessage() == "agent report refused"]
    assert logged.__dict__["fields"] == ["report.latency_buckets"]
    assert key not in caplog.text

    good = await agent.report(2, request_count=1, success_count=1, latency_buckets=[0, 1])
    assert (good.counted, good.refused, good.refusal) == (True, False, "")
    await agent.stream.write(A.ConnectRequest(heartbeat=A.AgentHeartbeat()))  # still open
    metrics = await client.tunnels.GetTunnelMetrics(
        P.GetTunnelMetricsRequest(name=f"{made.name}/metrics"), metadata=owner.metadata
    )
    assert (metrics.request_count, metrics.connection_count) == (1, 0)
    still = await client.tunnels.GetTunnel(
        P.GetTunnelRequest(name=made.name), metadata=owner.metadata
    )
    assert (still.state, still.connected_agents) == (P.Tunnel.STATE_CONNECTED, 1)
    agent.stream.cancel()
    again = Agent(client.agents, key, made.name)
    assert (await again.hello()).last_sequence == 2  # the refused report left no gap
    again.stream.cancel()


@pytest_asyncio.fixture(scope="module")
async def impatient(
    backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[App]:
    """A server that gives up on silent agents after half a second, on a database of its own
    (its sweeper would otherwise disconnect the shared server's quiet agents)."""
    directory = tmp_path_factory.mktemp("impatient")
    async with own_database(backend, directory) as isolated:
        server = App(isolated.settings(directory, agent_heartbeat_timeout=0.5))
        await server.start()
        yield server
        await server.stop(grace=0)


async def test_a_silent_agent_counts_as_gone_and_several_agents_share_a_tunnel(
    impatient: App,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{impatient.grpc_port}") as channel:
        client = Client(impatient, channel)
        owner = await client.new_user()
        made = await client.tunnel(owner)
        await client.tunnels.StartTunnel(
            P.StartTunnelRequest(name=made.name), metadata=owner.metadata
        )
        key = await agent_key(client, owner)
        stub = agents_pb2_grpc.AgentServiceStub(channel)
        chatty, silent = (
            Agent(stub, key, made.name, "chatty"),
            Agent(stub, key, made.name, "silent"),
        )
        await chatty.hello()
        await silent.hello()
        both = await wait_for_state(client, owner, made.name, connected_agents=2)
        assert both.health == P.Tunnel.HEALTH_HEALTHY

        async def heartbeats() -> None:
            while True:
                await chatty.stream.write(A.ConnectRequest(heartbeat=A.AgentHeartbeat()))
                await asyncio.sleep(0.1)

        beating = asyncio.create_task(heartbeats())
        try:
            one = await wait_for_state(client, owner, made.name, connected_agents=1)
            assert (one.state, one.health) == (P.Tunnel.STATE_CONNECTED, P.Tunnel.HEALTH_DEGRADED)
        finally:
            beating.cancel()
        none = await wait_for_state(client, owner, made.name, connected_agents=0)
        assert none.state == P.Tunnel.STATE_DISCONNECTED
        assert none.state_reason == "the last agent went silent"


@contextlib.asynccontextmanager
async def free_tier_with(
    backend: Backend, tmp_path_factory: pytest.TempPathFactory, **limits: int
) -> AsyncIterator[App]:
    """A server of its own whose free tier has these limits changed."""
    tiers = dict(DEFAULT_TIERS)
    tiers["free"] = replace(DEFAULT_TIERS["free"], **limits)
    directory = tmp_path_factory.mktemp("tiered")
    async with own_database(backend, directory) as isolated:
        server = App(isolated.settings(directory, tiers=tiers))
        await server.start()
        try:
            yield server
        finally:
            await server.stop(grace=0)


@pytest_asyncio.fixture(scope="module")
async def metered(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[App]:
    """A server whose free tier may move 1000 bytes a month."""
    async with free_tier_with(backend, tmp_path_factory, transfer_bytes_per_month=1000) as app:
        yield app


async def test_the_transfer_quota_stops_the_tunnel_and_is_reported(metered: App) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{metered.grpc_port}") as channel:
        client = Client(metered, channel)
        owner = await client.new_user()
        made = await client.tunnel(owner)
        started = P.StartTunnelRequest(name=made.name)
        await client.tunnels.StartTunnel(started, metadata=owner.metadata)
        agent = Agent(
            agents_pb2_grpc.AgentServiceStub(channel), await agent_key(client, owner), made.name
        )
        await agent.hello()
        running = await agent.desired()
        assert running.run == D.RUN_STARTED
        assert running.config.max_connections == 5  # the free tier's limit, made explicit
        await agent.report(1, connections=1, bytes_in=600, bytes_out=600, peak_concurrency=1)
        assert (await agent.desired()).run == D.RUN_STOPPED
        failed = await wait_for_state(client, owner, made.name, state=P.Tunnel.STATE_ERROR)
        assert "transfer" in failed.state_reason
        error = await fails(
            client.tunnels.StartTunnel(started, metadata=owner.metadata),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
        assert detail(error, error_details_pb2.QuotaFailure).violations[0].quota_id == (
            "TransferPerMonth"
        )
        usage = await client.users.GetUsage(
            users_pb2.GetUsageRequest(name="users/me/usage"), metadata=owner.metadata
        )
        quotas = {q.metric: (q.used, q.limit) for q in usage.quotas}
        assert quotas["transfer_bytes"] == (1200, 1000)
        assert quotas["tunnels"] == (1, 3)
        agent.stream.cancel()


@pytest_asyncio.fixture(scope="module")
async def timed(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[App]:
    """A server whose free tier may stream for a minute a month."""
    async with free_tier_with(backend, tmp_path_factory, stream_seconds_per_month=60) as app:
        yield app


async def test_the_stream_time_quota_stops_the_tunnel_and_is_reported(timed: App) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{timed.grpc_port}") as channel:
        client = Client(timed, channel)
        owner = await client.new_user()
        made = await client.tunnel(owner)
        started = P.StartTunnelRequest(name=made.name)
        await client.tunnels.StartTunnel(started, metadata=owner.metadata)
        agent = Agent(
            agents_pb2_grpc.AgentServiceStub(channel), await agent_key(client, owner), made.name
        )
        await agent.hello()
        assert (await agent.desired()).run == D.RUN_STARTED
        # One long LLM answer: 61 s open, few bytes.
        long_answer = {"stream_milliseconds": 61_000, "bytes_out": 10, "peak_concurrency": 1}
        await agent.report(1, connections=1, request_count=1, success_count=1, **long_answer)
        assert (await agent.desired()).run == D.RUN_STOPPED
        failed = await wait_for_state(client, owner, made.name, state=P.Tunnel.STATE_ERROR)
        assert "stream time" in failed.state_reason
        error = await fails(
            client.tunnels.StartTunnel(started, metadata=owner.metadata),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
        assert detail(error, error_details_pb2.QuotaFailure).violations[0].quota_id == (
            "StreamSecondsPerMonth"
        )
        usage = await client.users.GetUsage(
            users_pb2.GetUsageRequest(name="users/me/usage"), metadata=owner.metadata
        )
        quotas = {q.metric: (q.used, q.limit) for q in usage.quotas}
        assert quotas["stream_seconds"] == (61, 60)
        tier = await client.users.GetTier(users_pb2.GetTierRequest(name="tiers/free"))
        assert tier.stream_seconds_per_month == 60
        agent.stream.cancel()


async def test_an_agent_key_bound_to_a_tunnel_serves_that_tunnel_only(client: Client) -> None:
    owner = await client.new_user()
    mine, other = await client.tunnel(owner), await client.tunnel(owner)
    created = await client.auth.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(
            parent="users/me",
            api_key=auth_pb2.ApiKey(
                display_name="laptop", scopes=["agent.connect"], tunnel=mine.name
            ),
        ),
        metadata=owner.metadata,
    )
    assert created.api_key.tunnel == mine.name
    welcome = await Agent(client.agents, created.secret, mine.name).hello()
    assert welcome.session.startswith(mine.name)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await Agent(client.agents, created.secret, other.name).hello()
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason(refused.value) == "KEY_BOUND_TO_ANOTHER_TUNNEL"
    rotated = await client.auth.RotateApiKey(
        auth_pb2.RotateApiKeyRequest(name=created.api_key.name), metadata=owner.metadata
    )
    assert rotated.api_key.tunnel == mine.name  # rotation keeps the binding


async def test_revoking_the_agent_key_ends_its_session(client: Client) -> None:
    owner = await client.new_user()
    made = await client.tunnel(owner)
    created = await client.auth.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(
            parent="users/me", api_key=auth_pb2.ApiKey(display_name="a", scopes=["agent.connect"])
        ),
        metadata=owner.metadata,
    )
    agent = Agent(client.agents, created.secret, made.name)
    await agent.hello()
    await agent.desired()
    await client.auth.RevokeApiKey(
        auth_pb2.RevokeApiKeyRequest(name=created.api_key.name), metadata=owner.metadata
    )
    await agent.stream.write(A.ConnectRequest(heartbeat=A.AgentHeartbeat()))
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await agent.next()
    assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await wait_for_state(client, owner, made.name, connected_agents=0)


async def test_the_desired_state_names_the_proxy_links_and_the_target_url(
    backend: Backend, tmp_path: Path
) -> None:
    """Agents are told where to link to proxies (TP_PROXY_LINKS, each once, in order; no
    embedded proxy here) and the active endpoint's URL, and told again when it moves."""
    links = "proxy-a.internal:8091, [2001:db8::7]:9000,proxy-a.internal:8091"
    async with (
        own_server(backend, tmp_path, proxy_port=0, proxy_links=links) as server,
        client_of(server) as client,
    ):
        owner = await client.new_user()
        made = await client.tunnel(owner, endpoints=[P.TunnelEndpoint(url="http://127.0.0.1:7/v1")])
        agent = Agent(client.agents, await agent_key(client, owner), made.name)
        await agent.hello()
        first = await agent.desired()
        proxies = ["proxy-a.internal:8091", "[2001:db8::7]:9000"]
        assert list(first.proxy_links) == proxies
        assert (first.target_url, first.target) == (made.active_endpoint, "127.0.0.1:7")
        assert first.target_url.startswith("http://127.0.0.1:7")

        def endpoints(*urls: str) -> P.UpdateTunnelRequest:
            return P.UpdateTunnelRequest(
                tunnel=P.Tunnel(name=made.name, endpoints=[P.TunnelEndpoint(url=u) for u in urls]),
                update_mask=field_mask_pb2.FieldMask(paths=["endpoints"]),
            )

        await client.tunnels.UpdateTunnel(endpoints("tcp://127.0.0.1:9"), metadata=owner.metadata)
        moved = await agent.desired()
        assert (moved.target_url, moved.target) == ("tcp://127.0.0.1:9", "127.0.0.1:9")
        await client.tunnels.StartTunnel(
            P.StartTunnelRequest(name=made.name), metadata=owner.metadata
        )
        started = await agent.desired()
        assert (started.run, list(started.proxy_links)) == (D.RUN_STARTED, proxies)
        assert started.target_url == "tcp://127.0.0.1:9"
        await client.tunnels.UpdateTunnel(endpoints(), metadata=owner.metadata)
        none = await agent.desired()
        assert (none.target_url, none.target, list(none.proxy_links)) == ("", "", proxies)
        agent.stream.cancel()
