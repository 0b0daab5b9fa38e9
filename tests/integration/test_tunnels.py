"""Tunnels end to end over gRPC (and HTTP where the transport matters), on both backends:
life cycle, the state machine, validation, quotas and tiers, events and watch streams."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import grpc
import orjson
import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from google.rpc import error_details_pb2
from tunnelplane.v1 import auth_pb2, events_pb2, tunnels_pb2

from server.domain.identity.model import Tier
from tests.helpers import Client, TestUser, detail, eventually, fails, reason, violations

P = tunnels_pb2
W = P.WatchTunnelsResponse


async def get(client: Client, user: TestUser, name: str) -> P.Tunnel:
    return await client.tunnels.GetTunnel(P.GetTunnelRequest(name=name), metadata=user.metadata)


async def test_create_get_list_update_delete(client: Client) -> None:
    owner = await client.new_user()
    made = await client.tunnel(
        owner,
        "llm",
        description="my laptop's model server",
        config=P.TunnelConfig(max_connections=5, idle_timeout=duration_pb2.Duration(seconds=30)),
        endpoints=[P.TunnelEndpoint(url="http://127.0.0.1:11434/")],
    )
    assert made.name.startswith(f"{owner.name}/tunnels/tun_")
    assert (made.state, made.health) == (P.Tunnel.STATE_CREATED, P.Tunnel.HEALTH_UNKNOWN)
    assert made.listen_address.startswith("127.0.0.1:")
    assert made.active_endpoint == "http://127.0.0.1:11434/"
    assert made.config.idle_timeout.seconds == 30
    assert made.owner == owner.name
    assert await get(client, owner, made.name) == made

    listed = await client.tunnels.ListTunnels(
        P.ListTunnelsRequest(parent="users/me", filter='state = "created"'),
        metadata=owner.metadata,
    )
    assert [t.name for t in listed.tunnels] == [made.name]

    renamed = await client.tunnels.UpdateTunnel(
        P.UpdateTunnelRequest(
            tunnel=P.Tunnel(name=made.name, display_name="llm-2", etag=made.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        ),
        metadata=owner.metadata,
    )
    assert renamed.display_name == "llm-2"
    assert renamed.etag != made.etag
    stale = P.UpdateTunnelRequest(tunnel=P.Tunnel(name=made.name, description="x", etag=made.etag))
    await fails(
        client.tunnels.UpdateTunnel(stale, metadata=owner.metadata), grpc.StatusCode.ABORTED
    )

    deleted = await client.tunnels.DeleteTunnel(
        P.DeleteTunnelRequest(name=made.name), metadata=owner.metadata
    )
    assert deleted.name == made.name
    await fails(get(client, owner, made.name), grpc.StatusCode.NOT_FOUND)


async def test_listen_ports_do_not_depend_on_the_global_random(client: Client) -> None:
    """A test framework (hypothesis) seeds the global ``random`` before each example; the
    listen ports must not follow it, or every tunnel would try the same few ports."""
    owner = await client.new_user(tier=Tier.ENTERPRISE)
    ports = set()
    for _ in range(40):
        random.seed(7)
        made = await client.tunnel(owner)
        ports.add(made.listen_address)
    assert len(ports) == 40


async def test_names_are_unique_per_owner_and_creates_are_idempotent(client: Client) -> None:
    owner, other = await client.new_user(), await client.new_user()
    await client.tunnel(owner, "same")
    await client.tunnel(other, "same")  # another owner may use the name
    await fails(client.tunnel(owner, "same"), grpc.StatusCode.ALREADY_EXISTS)
    request = P.CreateTunnelRequest(
        parent=owner.name, tunnel=P.Tunnel(display_name="once"), request_id="req-1"
    )
    first = await client.tunnels.CreateTunnel(request, metadata=owner.metadata)
    again = await client.tunnels.CreateTunnel(request, metadata=owner.metadata)
    assert first == again


async def test_the_tier_tunnel_quota_refuses_with_quota_failure(client: Client) -> None:
    owner = await client.new_user()  # free: 3 tunnels
    for _ in range(3):
        await client.tunnel(owner)
    error = await fails(client.tunnel(owner), grpc.StatusCode.RESOURCE_EXHAUSTED)
    failure = detail(error, error_details_pb2.QuotaFailure)
    assert failure.violations[0].quota_id == "Tunnels"
    assert failure.violations[0].quota_value == 3


async def test_config_and_endpoints_are_validated_against_the_tier(client: Client) -> None:
    owner = await client.new_user()
    too_many = P.TunnelConfig(max_connections=6)  # free allows 5
    error = await fails(client.tunnel(owner, config=too_many), grpc.StatusCode.INVALID_ARGUMENT)
    assert "tunnel.config.max_connections" in violations(error)
    slow = P.TunnelConfig(idle_timeout=duration_pb2.Duration(seconds=7200))
    error = await fails(client.tunnel(owner, config=slow), grpc.StatusCode.INVALID_ARGUMENT)
    assert "tunnel.config.idle_timeout" in violations(error)
    bad = [P.TunnelEndpoint(url="ftp://example.com/"), P.TunnelEndpoint(url="http://a", weight=-1)]
    error = await fails(client.tunnel(owner, endpoints=bad), grpc.StatusCode.INVALID_ARGUMENT)
    assert {"tunnel.endpoints[0].url", "tunnel.endpoints[1].weight"} <= set(violations(error))
    two = [P.TunnelEndpoint(url="http://a:1"), P.TunnelEndpoint(url="http://b:1", priority=1)]
    error = await fails(client.tunnel(owner, endpoints=two), grpc.StatusCode.PERMISSION_DENIED)
    assert reason(error) == "TIER_TOO_LOW"
    premium = await client.new_user(tier=Tier.PREMIUM)
    made = await client.tunnel(premium, endpoints=two)
    assert made.active_endpoint == "http://a:1"


async def test_state_machine_refuses_illegal_transitions_naming_the_state(client: Client) -> None:
    owner = await client.new_user()
    made = await client.tunnel(owner)
    stop = client.tunnels.StopTunnel(P.StopTunnelRequest(name=made.name), metadata=owner.metadata)
    error = await fails(stop, grpc.StatusCode.FAILED_PRECONDITION)
    assert reason(error) == "ILLEGAL_TRANSITION"
    assert "created" in (error.details() or "")
    started = await client.tunnels.StartTunnel(
        P.StartTunnelRequest(name=made.name), metadata=owner.metadata
    )
    assert started.state == P.Tunnel.STATE_CONNECTING
    again = client.tunnels.StartTunnel(
        P.StartTunnelRequest(name=made.name), metadata=owner.metadata
    )
    await fails(again, grpc.StatusCode.FAILED_PRECONDITION)
    stopped = await client.tunnels.StopTunnel(
        P.StopTunnelRequest(name=made.name), metadata=owner.metadata
    )
    assert stopped.state == P.Tunnel.STATE_DISCONNECTED


async def test_every_change_is_in_the_event_log(client: Client) -> None:
    owner = await client.new_user()
    made = await client.tunnel(owner)
    await client.tunnels.StartTunnel(P.StartTunnelRequest(name=made.name), metadata=owner.metadata)
    await client.tunnels.DeleteTunnel(
        P.DeleteTunnelRequest(name=made.name), metadata=owner.metadata
    )
    listed = await client.events.ListEvents(
        events_pb2.ListEventsRequest(parent="users/me", filter='type = "tunnel.*"'),
        metadata=owner.metadata,
    )
    assert [e.type for e in listed.events] == [
        "tunnel.deleted",
        "tunnel.status_changed",
        "tunnel.created",
    ]
    changed = listed.events[1]
    assert changed.subject == made.name
    assert changed.actor == owner.name
    assert dict(changed.payload)["from"] == "created"
    assert dict(changed.payload)["to"] == "connecting"


async def next_message(stream: Any) -> W:
    message = await asyncio.wait_for(stream.read(), 10)
    assert message is not grpc.aio.EOF
    return message  # type: ignore[no-any-return]


async def test_watch_sends_the_current_state_then_each_change(client: Client) -> None:
    owner = await client.new_user()
    first = await client.tunnel(owner, "a")
    second = await client.tunnel(owner, "b")
    stream = client.tunnels.WatchTunnels(
        P.WatchTunnelsRequest(name=owner.name), metadata=owner.metadata
    )
    current = [await next_message(stream), await next_message(stream)]
    assert [m.kind for m in current] == [W.KIND_CURRENT, W.KIND_CURRENT]
    assert {m.tunnel.name for m in current} == {first.name, second.name}
    assert (await next_message(stream)).kind == W.KIND_SYNCED

    await client.tunnels.StartTunnel(P.StartTunnelRequest(name=first.name), metadata=owner.metadata)
    changed = await next_message(stream)
    assert (changed.kind, changed.event_type) == (W.KIND_CHANGED, "tunnel.status_changed")
    assert changed.tunnel.state == P.Tunnel.STATE_CONNECTING
    assert changed.event_id

    await client.tunnels.DeleteTunnel(
        P.DeleteTunnelRequest(name=second.name), metadata=owner.metadata
    )
    gone = await next_message(stream)
    assert (gone.kind, gone.tunnel.name) == (W.KIND_DELETED, second.name)
    stream.cancel()


async def test_watch_of_one_tunnel_ends_when_it_is_deleted(client: Client) -> None:
    owner = await client.new_user()
    made, other = await client.tunnel(owner), await client.tunnel(owner)
    stream = client.tunnels.WatchTunnels(
        P.WatchTunnelsRequest(name=made.name), metadata=owner.metadata
    )
    assert (await next_message(stream)).tunnel.name == made.name
    assert (await next_message(stream)).kind == W.KIND_SYNCED
    await client.tunnels.StartTunnel(P.StartTunnelRequest(name=other.name), metadata=owner.metadata)
    await client.tunnels.DeleteTunnel(
        P.DeleteTunnelRequest(name=made.name), metadata=owner.metadata
    )
    gone = await next_message(stream)  # the other tunnel's change was not sent
    assert (gone.kind, gone.tunnel.name) == (W.KIND_DELETED, made.name)
    assert await asyncio.wait_for(stream.read(), 10) is grpc.aio.EOF
    assert await stream.code() == grpc.StatusCode.OK


async def test_watch_over_http_is_ndjson_and_stops_when_the_client_leaves(
    client: Client, http: Any
) -> None:
    owner = await client.new_user()
    made = await client.tunnel(owner)
    bus = client.app.events.local_bus
    before = bus.subscriber_count
    headers = {"authorization": f"Bearer {owner.access_token}"}
    async with http.stream("GET", f"/v1/{made.name}:watch", headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = response.aiter_lines()
        first = orjson.loads(await asyncio.wait_for(anext(lines), 10))
        assert first["result"]["kind"] == "KIND_CURRENT"
        assert first["result"]["tunnel"]["name"] == made.name
        synced = orjson.loads(await asyncio.wait_for(anext(lines), 10))
        assert synced["result"]["kind"] == "KIND_SYNCED"
        await client.tunnels.StartTunnel(
            P.StartTunnelRequest(name=made.name), metadata=owner.metadata
        )
        changed = orjson.loads(await asyncio.wait_for(anext(lines), 10))
        assert changed["result"]["tunnel"]["state"] == "STATE_CONNECTING"
        assert bus.subscriber_count == before + 1
    # The server notices the disconnect on its own schedule.
    await eventually(lambda: bus.subscriber_count == before, within=10, every=0.05)


async def test_tunnels_over_http(client: Client, http: Any) -> None:
    owner = await client.new_user()
    auth = {"authorization": f"Bearer {owner.access_token}"}
    created = await http.post(
        "/v1/users/me/tunnels",
        json={"displayName": "web", "config": {"idleTimeout": "45s", "maxConnections": 2}},
        headers=auth,
    )
    assert created.status_code == 200, created.text
    body = created.json()
    assert body["state"] == "STATE_CREATED"
    assert body["config"]["idleTimeout"] == "45s"
    patched = await http.patch(
        f"/v1/{body['name']}",
        json={"description": "from the web", "etag": body["etag"]},
        headers=auth,
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["description"] == "from the web"
    assert patched.json()["displayName"] == "web"  # the mask was inferred from the body
    started = await http.post(f"/v1/{body['name']}:start", json={}, headers=auth)
    assert started.json()["state"] == "STATE_CONNECTING"
    again = await http.post(f"/v1/{body['name']}:start", json={}, headers=auth)
    assert again.status_code == 400  # FAILED_PRECONDITION
    assert again.json()["details"][0]["metadata"]["state"] == "connecting"
    bad = await http.post("/v1/users/me/tunnels", json={"displayName": ""}, headers=auth)
    assert bad.status_code == 400
    assert bad.json()["details"][1]["fieldViolations"][0]["field"] == "tunnel.display_name"
    for name in ("b", "c"):
        await http.post("/v1/users/me/tunnels", json={"displayName": name}, headers=auth)
    over = await http.post("/v1/users/me/tunnels", json={"displayName": "d"}, headers=auth)
    assert over.status_code == 429
    quota = next(d for d in over.json()["details"] if d["@type"].endswith("QuotaFailure"))
    assert quota["violations"][0]["quotaId"] == "Tunnels"


async def test_watch_over_http_as_server_sent_events(client: Client, http: Any) -> None:
    owner = await client.new_user()
    made = await client.tunnel(owner)
    headers = {"authorization": f"Bearer {owner.access_token}", "accept": "text/event-stream"}
    async with http.stream("GET", "/v1/users/me/tunnels:watch", headers=headers) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.aiter_lines()
        data = [line async for line in _take_data(lines, 2)]
        assert orjson.loads(data[0])["result"]["tunnel"]["name"] == made.name
        assert orjson.loads(data[1])["result"]["kind"] == "KIND_SYNCED"


async def _take_data(lines: Any, count: int) -> Any:
    taken = 0
    while taken < count:
        line = await asyncio.wait_for(anext(lines), 10)
        if line.startswith("data:"):
            taken += 1
            yield line.removeprefix("data:").strip()


async def test_a_watch_ends_once_its_session_is_logged_out(client: Client) -> None:
    owner = await client.new_user()
    made = await client.tunnel(owner)
    other = await client.login(owner.email)  # a second session changes the tunnel
    changer = (("authorization", f"Bearer {other.tokens.access_token}"),)
    stream = client.tunnels.WatchTunnels(
        P.WatchTunnelsRequest(name=made.name), metadata=owner.metadata
    )
    await next_message(stream)
    await next_message(stream)  # synced
    await client.auth.Logout(auth_pb2.LogoutRequest(), metadata=owner.metadata)
    await client.tunnels.StartTunnel(P.StartTunnelRequest(name=made.name), metadata=changer)
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await asyncio.wait_for(stream.read(), 10)
    assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
