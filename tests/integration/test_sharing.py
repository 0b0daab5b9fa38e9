"""Sharing tunnels over both transports: shares and their roles, expiry, share links with
a use limit, ListSharedWithMe, the premium gate; and the user events of the event log."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from tunnelplane.v1 import common_pb2, events_pb2, tunnels_pb2, users_pb2

from server.domain.identity.model import Role, Tier
from tests.helpers import Client, TestUser, eventually, fails, reason

P = tunnels_pb2
READ, WRITE, ADMIN = (
    common_pb2.SHARE_ROLE_READ,
    common_pb2.SHARE_ROLE_WRITE,
    common_pb2.SHARE_ROLE_ADMIN,
)


async def share(
    client: Client, owner: TestUser, tunnel: str, grantee: TestUser, role: int, **fields: Any
) -> P.TunnelShare:
    return await client.tunnels.CreateTunnelShare(
        P.CreateTunnelShareRequest(
            parent=tunnel, share=P.TunnelShare(grantee=grantee.name, role=role, **fields)
        ),
        metadata=owner.metadata,
    )


def get(client: Client, user: TestUser, name: str) -> Any:
    return client.tunnels.GetTunnel(P.GetTunnelRequest(name=name), metadata=user.metadata)


async def test_a_share_grants_its_role_and_nothing_more_until_revoked(client: Client) -> None:
    owner = await client.new_user(tier=Tier.PREMIUM)
    reader, writer = await client.new_user(), await client.new_user()
    made = await client.tunnel(owner)
    granted = await share(client, owner, made.name, reader, READ)
    assert granted.name == f"{made.name}/shares/{reader.id}"
    assert (granted.grantee, granted.creator, granted.tunnel) == (
        reader.name,
        owner.name,
        made.name,
    )
    await share(client, owner, made.name, writer, WRITE)

    assert (await get(client, reader, made.name)).name == made.name
    start = P.StartTunnelRequest(name=made.name)
    denied = await fails(
        client.tunnels.StartTunnel(start, metadata=reader.metadata),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert reason(denied) == "NOT_OWNER"
    started = await client.tunnels.StartTunnel(start, metadata=writer.metadata)
    assert started.state == P.Tunnel.STATE_CONNECTING
    # Write is not admin: the writer may not delete the tunnel or manage its shares.
    await fails(
        client.tunnels.DeleteTunnel(
            P.DeleteTunnelRequest(name=made.name), metadata=writer.metadata
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    shared = await client.tunnels.ListSharedWithMe(
        P.ListSharedWithMeRequest(parent="users/me"), metadata=reader.metadata
    )
    assert [(s.tunnel.name, s.role) for s in shared.tunnels] == [(made.name, READ)]

    listed = await client.tunnels.ListTunnelShares(
        P.ListTunnelSharesRequest(parent=made.name), metadata=owner.metadata
    )
    assert {s.grantee for s in listed.shares} == {reader.name, writer.name}
    await client.tunnels.DeleteTunnelShare(
        P.DeleteTunnelShareRequest(name=granted.name), metadata=owner.metadata
    )
    await fails(get(client, reader, made.name), grpc.StatusCode.PERMISSION_DENIED)


async def test_an_expired_share_grants_nothing(client: Client) -> None:
    owner, guest = await client.new_user(tier=Tier.PREMIUM), await client.new_user()
    made = await client.tunnel(owner)
    soon = timestamp_pb2.Timestamp()
    soon.FromDatetime(datetime.now(UTC) + timedelta(seconds=1))
    await share(client, owner, made.name, guest, READ, expire_time=soon)
    assert (await get(client, guest, made.name)).name == made.name

    async def lapsed() -> bool:  # on the server's clock
        try:
            await get(client, guest, made.name)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            return True
        return False

    await eventually(lapsed, within=5, every=0.05)
    listed = await client.tunnels.ListTunnelShares(
        P.ListTunnelSharesRequest(parent=made.name), metadata=owner.metadata
    )
    assert listed.shares[0].expired


async def test_share_links_are_used_up_and_revocable(client: Client) -> None:
    owner = await client.new_user(tier=Tier.PREMIUM)
    first, second = await client.new_user(), await client.new_user()
    made = await client.tunnel(owner)
    link = await client.tunnels.CreateShareLink(
        P.CreateShareLinkRequest(parent=made.name, share_link=P.ShareLink(role=WRITE, max_uses=1)),
        metadata=owner.metadata,
    )
    assert link.token.startswith("tpl_")
    assert link.active
    accepted = await client.tunnels.AcceptShareLink(
        P.AcceptShareLinkRequest(token=link.token), metadata=first.metadata
    )
    assert (accepted.grantee, accepted.role) == (first.name, WRITE)
    used_up = await fails(
        client.tunnels.AcceptShareLink(
            P.AcceptShareLinkRequest(token=link.token), metadata=second.metadata
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert reason(used_up) == "SHARE_LINK_UNUSABLE"
    listed = await client.tunnels.ListShareLinks(
        P.ListShareLinksRequest(parent=made.name), metadata=owner.metadata
    )
    assert (listed.share_links[0].use_count, listed.share_links[0].token) == (1, "")

    another = await client.tunnels.CreateShareLink(
        P.CreateShareLinkRequest(parent=made.name, share_link=P.ShareLink(role=READ, max_uses=5)),
        metadata=owner.metadata,
    )
    revoked = await client.tunnels.DeleteShareLink(
        P.DeleteShareLinkRequest(name=another.name), metadata=owner.metadata
    )
    assert not revoked.active
    await fails(
        client.tunnels.AcceptShareLink(
            P.AcceptShareLinkRequest(token=another.token), metadata=second.metadata
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )


async def test_sharing_needs_premium_over_both_transports(client: Client, http: Any) -> None:
    owner, guest = await client.new_user(), await client.new_user()
    made = await client.tunnel(owner)
    error = await fails(
        share(client, owner, made.name, guest, READ), grpc.StatusCode.PERMISSION_DENIED
    )
    assert reason(error) == "TIER_TOO_LOW"
    response = await http.post(
        f"/v1/{made.name}/shares",
        json={"grantee": guest.name, "role": "SHARE_ROLE_READ"},
        headers={"authorization": f"Bearer {owner.access_token}"},
    )
    assert response.status_code == 403
    assert response.json()["details"][0]["reason"] == "TIER_TOO_LOW"


async def test_shares_over_http(client: Client, http: Any) -> None:
    owner, guest = await client.new_user(tier=Tier.PREMIUM), await client.new_user()
    made = await client.tunnel(owner)
    auth = {"authorization": f"Bearer {owner.access_token}"}
    created = await http.post(
        f"/v1/{made.name}/shares",
        json={"grantee": guest.name, "role": "SHARE_ROLE_READ"},
        headers=auth,
    )
    assert created.status_code == 200, created.text
    seen = await http.get(
        f"/v1/{made.name}", headers={"authorization": f"Bearer {guest.access_token}"}
    )
    assert seen.status_code == 200
    assert seen.json()["name"] == made.name
    bad = await http.post(f"/v1/{made.name}/shares", json={"grantee": guest.name}, headers=auth)
    assert bad.status_code == 400
    assert bad.json()["details"][1]["fieldViolations"][0]["field"] == "share.role"


async def test_user_events_are_in_the_log(client: Client) -> None:
    user = await client.new_user()
    await client.users.ChangeTier(
        users_pb2.ChangeTierRequest(name="users/me", tier=common_pb2.TIER_PREMIUM),
        metadata=user.metadata,
    )
    listed = await client.events.ListEvents(
        events_pb2.ListEventsRequest(parent="users/me", filter='type = "user.*"'),
        metadata=user.metadata,
    )
    assert [e.type for e in listed.events] == ["user.tier_changed", "user.created"]
    changed = listed.events[0]
    assert (dict(changed.payload)["from"], dict(changed.payload)["to"]) == ("free", "premium")
    assert changed.actor == user.name

    await client.users.DeleteUser(
        users_pb2.DeleteUserRequest(name="users/me"), metadata=user.metadata
    )
    admin = await client.new_user(role=Role.SUPER_ADMIN)
    after = await client.events.ListEvents(
        events_pb2.ListEventsRequest(parent=user.name, filter='type = "user.deleted"'),
        metadata=admin.metadata,
    )
    assert [e.subject for e in after.events] == [user.name]


async def test_a_watch_through_a_share_ends_when_the_share_does(client: Client) -> None:
    owner, guest = await client.new_user(tier=Tier.PREMIUM), await client.new_user()
    made = await client.tunnel(owner)
    granted = await share(client, owner, made.name, guest, READ)
    stream = client.tunnels.WatchTunnels(
        P.WatchTunnelsRequest(name=made.name), metadata=guest.metadata
    )
    assert (await asyncio.wait_for(stream.read(), 10)).tunnel.name == made.name
    await asyncio.wait_for(stream.read(), 10)  # synced
    await client.tunnels.DeleteTunnelShare(
        P.DeleteTunnelShareRequest(name=granted.name), metadata=owner.metadata
    )
    await client.tunnels.StartTunnel(P.StartTunnelRequest(name=made.name), metadata=owner.metadata)
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await asyncio.wait_for(stream.read(), 10)
    assert ended.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason(ended.value) == "SHARE_ENDED"
