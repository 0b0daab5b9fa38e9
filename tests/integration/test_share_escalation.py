"""Share escalation, tried as an attacker would, over both transports and both backends.

A holder of an ``admin`` share may share the tunnel on, but only within their own share:
never their own share, never for longer than it, never a share they did not grant; what
they grant (shares and links) names them and their share, and ends with that share.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest_asyncio
import sqlalchemy as sa
from google.protobuf import duration_pb2, timestamp_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tunnelplane.v1 import common_pb2, tunnels_pb2, users_pb2

from server.app import App
from server.domain.identity.model import Tier
from server.storage.tables import audit_log
from tests.helpers import Client, TestUser, eventually, fails, reason, violations

P = tunnels_pb2
READ, WRITE, ADMIN = (
    common_pb2.SHARE_ROLE_READ,
    common_pb2.SHARE_ROLE_WRITE,
    common_pb2.SHARE_ROLE_ADMIN,
)
DENIED, INVALID, UNUSABLE = (
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
)


def at(delta: timedelta) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(datetime.now(UTC) + delta)
    return stamp


def rfc3339(delta: timedelta) -> str:
    return (datetime.now(UTC) + delta).isoformat().replace("+00:00", "Z")


def when(stamp: timestamp_pb2.Timestamp, present: bool) -> datetime:
    """An expiry as a time (unset: never)."""
    return stamp.ToDatetime(UTC) if present else datetime.max.replace(tzinfo=UTC)


def share_call(
    client: Client, by: TestUser, tunnel: str, grantee: TestUser, role: int, **fields: Any
) -> Any:
    return client.tunnels.CreateTunnelShare(
        P.CreateTunnelShareRequest(
            parent=tunnel, share=P.TunnelShare(grantee=grantee.name, role=role, **fields)
        ),
        metadata=by.metadata,
    )


def link_call(client: Client, by: TestUser, tunnel: str, role: int, **fields: Any) -> Any:
    fields.setdefault("max_uses", 5)
    return client.tunnels.CreateShareLink(
        P.CreateShareLinkRequest(parent=tunnel, share_link=P.ShareLink(role=role, **fields)),
        metadata=by.metadata,
    )


def accept_call(client: Client, by: TestUser, token: str) -> Any:
    return client.tunnels.AcceptShareLink(
        P.AcceptShareLinkRequest(token=token), metadata=by.metadata
    )


def revoke_call(client: Client, by: TestUser, name: str) -> Any:
    return client.tunnels.DeleteTunnelShare(
        P.DeleteTunnelShareRequest(name=name), metadata=by.metadata
    )


async def shares_of(client: Client, owner: TestUser, tunnel: str) -> dict[str, P.TunnelShare]:
    listed = await client.tunnels.ListTunnelShares(
        P.ListTunnelSharesRequest(parent=tunnel, page_size=1000), metadata=owner.metadata
    )
    return {s.name: s for s in listed.shares}


async def links_of(client: Client, owner: TestUser, tunnel: str) -> dict[str, P.ShareLink]:
    listed = await client.tunnels.ListShareLinks(
        P.ListShareLinksRequest(parent=tunnel, page_size=1000), metadata=owner.metadata
    )
    return {link.name: link for link in listed.share_links}


async def can_read(client: Client, user: TestUser, tunnel: str) -> bool:
    try:
        await client.tunnels.GetTunnel(P.GetTunnelRequest(name=tunnel), metadata=user.metadata)
    except grpc.aio.AioRpcError as error:
        assert error.code() == DENIED, error.details()
        return False
    return True


def bearer(user: TestUser) -> dict[str, str]:
    return {"authorization": f"Bearer {user.access_token}"}


def http_violations(body: dict[str, Any]) -> dict[str, str]:
    return {
        v["field"]: v["description"] for d in body["details"] for v in d.get("fieldViolations", [])
    }


async def _users(client: Client, n: int) -> AsyncIterator[TestUser]:
    for _ in range(n):
        yield await client.new_user(tag="user")


@dataclass
class Scene:
    owner: TestUser
    tunnel: str
    holder: TestUser  # an admin share that ends in an hour
    holder_share: P.TunnelShare


async def scene(client: Client, *, lasts: timedelta | None = timedelta(hours=1)) -> Scene:
    owner = await client.new_user(tier=Tier.PREMIUM, tag="owner")
    holder = await client.new_user(tag="holder")
    tunnel = (await client.tunnel(owner)).name
    fields = {} if lasts is None else {"expire_time": at(lasts)}
    granted = await share_call(client, owner, tunnel, holder, ADMIN, **fields)
    return Scene(owner, tunnel, holder, granted)


async def test_a_grantee_cannot_regrant_their_own_share(client: Client, http: Any) -> None:
    s = await scene(client)
    error = await fails(share_call(client, s.holder, s.tunnel, s.holder, ADMIN), DENIED)
    assert reason(error) == "OWN_SHARE"
    response = await http.post(
        f"/v1/{s.tunnel}/shares",
        json={"grantee": s.holder.name, "role": "SHARE_ROLE_ADMIN"},
        headers=bearer(s.holder),
    )
    assert response.status_code == 403, response.text
    assert response.json()["details"][0]["reason"] == "OWN_SHARE"
    unchanged = (await shares_of(client, s.owner, s.tunnel))[s.holder_share.name]
    assert unchanged.expire_time == s.holder_share.expire_time
    assert unchanged.creator == s.owner.name


async def test_a_grantee_cannot_grant_beyond_their_share(client: Client, http: Any) -> None:
    s = await scene(client)
    friend = await client.new_user(tag="friend")
    forever = await fails(share_call(client, s.holder, s.tunnel, friend, ADMIN), INVALID)
    assert "share.expire_time" in violations(forever)
    later = await fails(
        share_call(client, s.holder, s.tunnel, friend, READ, expire_time=at(timedelta(hours=2))),
        INVALID,
    )
    assert "share.expire_time" in violations(later)
    response = await http.post(
        f"/v1/{s.tunnel}/shares",
        json={"grantee": friend.name, "role": "SHARE_ROLE_ADMIN"},
        headers=bearer(s.holder),
    )
    assert response.status_code == 400, response.text
    assert "share.expire_time" in http_violations(response.json())
    assert not await can_read(client, friend, s.tunnel)

    within = await share_call(
        client, s.holder, s.tunnel, friend, WRITE, expire_time=at(timedelta(minutes=30))
    )
    assert (within.creator, within.grantor_share) == (s.holder.name, s.holder_share.name)
    assert await can_read(client, friend, s.tunnel)


async def test_read_and_write_holders_grant_nothing(client: Client, http: Any) -> None:
    owner = await client.new_user(tier=Tier.PREMIUM)
    tunnel = (await client.tunnel(owner)).name
    friend = await client.new_user(tag="friend")
    for role, role_name in ((READ, "SHARE_ROLE_READ"), (WRITE, "SHARE_ROLE_WRITE")):
        holder = await client.new_user(tag="holder")
        await share_call(client, owner, tunnel, holder, role)
        await fails(share_call(client, holder, tunnel, friend, READ), DENIED)
        await fails(share_call(client, holder, tunnel, holder, ADMIN), DENIED)
        await fails(link_call(client, holder, tunnel, READ), DENIED)
        for path, body in (
            ("shares", {"grantee": friend.name, "role": role_name}),
            ("shareLinks", {"role": role_name, "maxUses": 1}),
        ):
            response = await http.post(f"/v1/{tunnel}/{path}", json=body, headers=bearer(holder))
            assert response.status_code == 403, response.text
    assert not await can_read(client, friend, tunnel)


async def test_a_grantee_link_is_capped_by_their_share(client: Client, http: Any) -> None:
    s = await scene(client)
    ends = s.holder_share.expire_time.ToDatetime(UTC)
    late = await fails(
        link_call(client, s.holder, s.tunnel, READ, expire_time=at(timedelta(hours=2))), INVALID
    )
    assert "share_link.expire_time" in violations(late)
    long_ttl = await fails(
        link_call(client, s.holder, s.tunnel, READ, share_ttl=duration_pb2.Duration(seconds=7200)),
        INVALID,
    )
    assert "share_link.share_ttl" in violations(long_ttl)
    response = await http.post(
        f"/v1/{s.tunnel}/shareLinks",
        json={"role": "SHARE_ROLE_READ", "maxUses": 1, "expireTime": rfc3339(timedelta(days=3))},
        headers=bearer(s.holder),
    )
    assert response.status_code == 400, response.text
    assert "share_link.expire_time" in http_violations(response.json())

    # Unset, the link's expiry (7 days) and its shares' (as long as the tunnel) are capped.
    link = await link_call(client, s.holder, s.tunnel, WRITE)
    assert link.expire_time.ToDatetime(UTC) <= ends
    assert (link.creator, link.grantor_share) == (s.holder.name, s.holder_share.name)
    listed = (await links_of(client, s.owner, s.tunnel))[link.name]
    assert (listed.creator, listed.grantor_share) == (s.holder.name, s.holder_share.name)
    guest = await client.new_user(tag="guest")
    accepted = await accept_call(client, guest, link.token)
    assert accepted.HasField("expire_time")
    assert accepted.expire_time.ToDatetime(UTC) <= ends
    assert (accepted.role, accepted.creator) == (WRITE, s.holder.name)
    assert accepted.grantor_share == s.holder_share.name


async def test_a_grantee_cannot_accept_their_own_link(client: Client, http: Any) -> None:
    s = await scene(client, lasts=None)
    link = await link_call(client, s.holder, s.tunnel, ADMIN)
    error = await fails(accept_call(client, s.holder, link.token), INVALID)
    assert "token" in violations(error)
    response = await http.post(
        "/v1/shareLinks:accept", json={"token": link.token}, headers=bearer(s.holder)
    )
    assert response.status_code == 400, response.text
    assert "token" in http_violations(response.json())


async def test_accepting_a_link_never_merges_two_grants_into_more(client: Client) -> None:
    s = await scene(client)  # admin for an hour
    longer_read = await link_call(
        client, s.owner, s.tunnel, READ, share_ttl=duration_pb2.Duration(seconds=7200)
    )
    accepted = await accept_call(client, s.holder, longer_read.token)
    # Not admin for two hours (the better role of one grant, the longer time of the other):
    # the link's share replaces the one it does not fall short of.
    assert accepted.role == READ
    assert accepted.expire_time.ToDatetime(UTC) > s.holder_share.expire_time.ToDatetime(UTC)

    better = await share_call(client, s.owner, s.tunnel, s.holder, ADMIN)
    short_admin = await link_call(
        client, s.owner, s.tunnel, ADMIN, share_ttl=duration_pb2.Duration(seconds=1800)
    )
    kept = await accept_call(client, s.holder, short_admin.token)
    assert (kept.role, kept.HasField("expire_time")) == (ADMIN, False)
    assert kept.create_time == better.create_time
    assert (await links_of(client, s.owner, s.tunnel))[short_admin.name].use_count == 0


async def test_revoking_a_share_ends_what_its_holder_granted(client: Client, http: Any) -> None:
    s = await scene(client, lasts=None)
    friend, guest, late = [u async for u in _users(client, 3)]
    await share_call(client, s.holder, s.tunnel, friend, ADMIN)
    their_link = await link_call(client, s.holder, s.tunnel, READ)
    friends_link = await link_call(client, friend, s.tunnel, READ)
    spare = await link_call(client, s.holder, s.tunnel, READ)
    await accept_call(client, guest, their_link.token)
    assert all([await can_read(client, u, s.tunnel) for u in (friend, guest)])

    await revoke_call(client, s.owner, s.holder_share.name)

    for user in (s.holder, friend, guest):
        assert not await can_read(client, user, s.tunnel)
    assert await shares_of(client, s.owner, s.tunnel) == {}
    links = await links_of(client, s.owner, s.tunnel)
    assert not any(link.active for link in links.values())
    # The holder (or anyone) re-entering through a link made through the revoked share.
    for token in (their_link.token, friends_link.token):
        again = await fails(accept_call(client, s.holder, token), UNUSABLE)
        assert reason(again) == "SHARE_LINK_UNUSABLE"
    response = await http.post(
        "/v1/shareLinks:accept", json={"token": spare.token}, headers=bearer(late)
    )
    assert response.status_code == 400, response.text
    assert response.json()["details"][0]["reason"] == "SHARE_LINK_UNUSABLE"
    assert not await can_read(client, late, s.tunnel)


async def test_a_chain_is_capped_by_its_root(client: Client) -> None:
    s = await scene(client)
    first, second = [u async for u in _users(client, 2)]
    mid = await share_call(
        client, s.holder, s.tunnel, first, ADMIN, expire_time=at(timedelta(minutes=50))
    )
    await fails(share_call(client, first, s.tunnel, second, READ), INVALID)
    await share_call(client, first, s.tunnel, second, ADMIN, expire_time=at(timedelta(minutes=40)))
    link = await link_call(client, first, s.tunnel, ADMIN)
    assert link.grantor_share == mid.name

    # The owner cuts the root short and down to read: everything below follows.
    cut = await share_call(
        client, s.owner, s.tunnel, s.holder, READ, expire_time=at(timedelta(minutes=10))
    )
    limit = cut.expire_time.ToDatetime(UTC)
    shares = await shares_of(client, s.owner, s.tunnel)
    assert len(shares) == 3
    for share in shares.values():
        assert share.role == READ
        assert share.expire_time.ToDatetime(UTC) <= limit
    narrowed = (await links_of(client, s.owner, s.tunnel))[link.name]
    assert narrowed.role == READ
    assert narrowed.expire_time.ToDatetime(UTC) <= limit
    # Read holders grant nothing any more, wherever they are in the chain.
    stranger = await client.new_user(tag="stranger")
    await fails(
        share_call(client, first, s.tunnel, stranger, READ, expire_time=at(timedelta(minutes=5))),
        DENIED,
    )
    accepted = await accept_call(client, stranger, link.token)
    assert accepted.role == READ
    assert accepted.expire_time.ToDatetime(UTC) <= limit

    await revoke_call(client, s.owner, s.holder_share.name)
    assert await shares_of(client, s.owner, s.tunnel) == {}


async def test_grantees_act_only_on_what_came_through_their_share(client: Client) -> None:
    s = await scene(client, lasts=None)
    peer, friend, other = [u async for u in _users(client, 3)]
    peer_share = await share_call(client, s.owner, s.tunnel, peer, READ)
    owners_link = await link_call(client, s.owner, s.tunnel, READ)
    for attempt in (
        revoke_call(client, s.holder, peer_share.name),
        share_call(client, s.holder, s.tunnel, peer, ADMIN),
        client.tunnels.DeleteShareLink(
            P.DeleteShareLinkRequest(name=owners_link.name), metadata=s.holder.metadata
        ),
    ):
        assert reason(await fails(attempt, DENIED)) == "NOT_GRANTOR"
    assert (await shares_of(client, s.owner, s.tunnel))[peer_share.name].role == READ

    # Down the chain, never up it: a friend cannot re-grant the share above theirs.
    friend_share = await share_call(client, s.holder, s.tunnel, friend, ADMIN)
    upward = await fails(share_call(client, friend, s.tunnel, s.holder, ADMIN), DENIED)
    assert reason(upward) == "NOT_GRANTOR"
    await share_call(client, friend, s.tunnel, other, READ)
    assert reason(await fails(revoke_call(client, friend, s.holder_share.name), DENIED)) == (
        "NOT_GRANTOR"
    )
    # ... but the holder may change and revoke what was granted through theirs.
    await share_call(client, s.holder, s.tunnel, other, WRITE)
    their_link = await link_call(client, friend, s.tunnel, READ)
    revoked_link = await client.tunnels.DeleteShareLink(
        P.DeleteShareLinkRequest(name=their_link.name), metadata=s.holder.metadata
    )
    assert not revoked_link.active
    await revoke_call(client, s.holder, friend_share.name)
    assert not await can_read(client, friend, s.tunnel)
    assert await can_read(client, other, s.tunnel)  # re-granted by the holder directly


async def audit_entry(client: Client, call: Any) -> Any:
    """The one audit entry of a finished call."""
    request_id = dict(await call.initial_metadata())["x-request-id"]
    async with client.app.db.engine.connect() as conn:
        result = await conn.execute(
            sa.select(audit_log).where(audit_log.c.request_id == request_id)
        )
        rows = result.mappings().all()
    assert len(rows) == 1
    return rows[0]


async def test_what_a_grantee_does_names_them(client: Client) -> None:
    s = await scene(client, lasts=None)
    friend, guest = [u async for u in _users(client, 2)]
    granted = share_call(client, s.holder, s.tunnel, friend, READ)
    made = await granted
    linked = link_call(client, s.holder, s.tunnel, READ)
    link = await linked
    accepting = accept_call(client, guest, link.token)
    accepted = await accepting
    assert made.creator == link.creator == accepted.creator == s.holder.name
    revoking = revoke_call(client, s.holder, made.name)
    await revoking

    for call, resource in ((granted, made.name), (linked, link.name), (revoking, made.name)):
        entry = await audit_entry(client, call)
        assert (entry["actor_user_id"], entry["subject_user_id"]) == (s.holder.id, s.owner.id)
        assert entry["resource"] == resource
        assert entry["details"]["through_share"] == s.holder_share.name
    entry = await audit_entry(client, accepting)
    assert (entry["actor_user_id"], entry["subject_user_id"]) == (guest.id, s.owner.id)
    assert (entry["resource"], entry["details"]["link"]) == (accepted.name, link.name)


async def test_an_erased_grantor_leaves_nothing_behind(client: Client) -> None:
    s = await scene(client, lasts=None)
    friend, guest = [u async for u in _users(client, 2)]
    await share_call(client, s.holder, s.tunnel, friend, WRITE)
    link = await link_call(client, s.holder, s.tunnel, READ)
    await client.users.DeleteUser(
        users_pb2.DeleteUserRequest(name="users/me", purge=True), metadata=s.holder.metadata
    )
    assert not await can_read(client, friend, s.tunnel)
    shared = await client.tunnels.ListSharedWithMe(
        P.ListSharedWithMeRequest(parent="users/me"), metadata=friend.metadata
    )
    assert list(shared.tunnels) == []
    await fails(accept_call(client, guest, link.token), UNUSABLE)


async def test_the_expiry_of_a_share_ends_its_links(client: Client) -> None:
    s = await scene(client, lasts=timedelta(seconds=5))
    link = await link_call(client, s.holder, s.tunnel, READ)
    assert link.expire_time == s.holder_share.expire_time
    guest = await client.new_user(tag="guest")

    async def lapsed() -> bool:  # on the server's clock
        return not await can_read(client, s.holder, s.tunnel)

    await eventually(lapsed, within=15, every=0.1)
    await fails(accept_call(client, guest, link.token), UNUSABLE)
    assert not await can_read(client, guest, s.tunnel)


# --- the law, for random sequences of grants ---------------------------------------------


@dataclass
class Cast:
    owner: TestUser
    users: list[TestUser]


@pytest_asyncio.fixture(scope="session")
async def cast(app: App, channel: grpc.aio.Channel) -> Cast:
    """An owner and five users, made once per backend (hashing passwords is slow)."""
    client = Client(app, channel)
    owner = await client.new_user(tier=Tier.PREMIUM, tag="law-owner")
    return Cast(owner, [await client.new_user(tag="law") for _ in range(5)])


roles = st.sampled_from([READ, WRITE, ADMIN])
minutes = st.one_of(st.none(), st.integers(1, 240))
person = st.integers(0, 5)  # 0: the owner
#: What the owner grants first: mostly admin shares, so that holders have something to share.
roots = st.lists(
    st.tuples(st.just("grant"), st.just(0), st.integers(1, 5), st.just(ADMIN), minutes),
    min_size=1,
    max_size=3,
)
step = st.one_of(
    st.tuples(st.just("grant"), person, st.integers(1, 5), roles, minutes),
    st.tuples(st.just("link"), person, roles, minutes, minutes),
    st.tuples(st.just("accept"), st.integers(1, 5), st.integers(0, 9)),
    st.tuples(st.just("revoke"), person, st.integers(1, 5)),
)
EXPECTED_REFUSALS = {DENIED, INVALID, UNUSABLE, grpc.StatusCode.NOT_FOUND}


async def perform(
    client: Client, cast: Cast, tunnel: str, tokens: list[str], move: tuple[Any, ...]
) -> None:
    people = [cast.owner, *cast.users]
    kind, by = move[0], people[move[1]]
    if kind == "grant":
        _, _, to, role, mins = move
        extra = {} if mins is None else {"expire_time": at(timedelta(minutes=mins))}
        await share_call(client, by, tunnel, cast.users[to - 1], role, **extra)
    elif kind == "link":
        _, _, role, mins, ttl = move
        extra: dict[str, Any] = {} if mins is None else {"expire_time": at(timedelta(minutes=mins))}
        if ttl is not None:
            extra["share_ttl"] = duration_pb2.Duration(seconds=ttl * 60)
        tokens.append((await link_call(client, by, tunnel, role, **extra)).token)
    elif kind == "accept" and tokens:
        await accept_call(client, by, tokens[move[2] % len(tokens)])
    elif kind == "revoke":
        await revoke_call(client, by, f"{tunnel}/shares/{cast.users[move[2] - 1].id}")


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(first=roots, moves=st.lists(step, min_size=1, max_size=12))
async def test_nothing_granted_exceeds_its_grantor(
    client: Client, cast: Cast, first: list[tuple[Any, ...]], moves: list[tuple[Any, ...]]
) -> None:
    """Whatever anyone tries, no share or live link has a higher role or a later expiry
    than the share it was granted through, and that share exists; only the owner grants
    without one."""
    tunnel = (await client.tunnel(cast.owner)).name
    tokens: list[str] = []
    for move in [*first, *moves]:
        try:
            await perform(client, cast, tunnel, tokens, move)
        except grpc.aio.AioRpcError as error:
            assert error.code() in EXPECTED_REFUSALS, (move, error.code(), error.details())
    shares = await shares_of(client, cast.owner, tunnel)
    links = await links_of(client, cast.owner, tunnel)
    grants: list[Any] = [*shares.values(), *(link for link in links.values() if link.active)]
    for made in grants:
        if not made.grantor_share:
            assert made.creator == cast.owner.name, made
            continue
        above = shares.get(made.grantor_share)
        assert above is not None, f"{made.name} outlived {made.grantor_share}"
        assert made.creator == above.grantee
        assert made.role <= above.role, (made, above)
        assert when(made.expire_time, made.HasField("expire_time")) <= when(
            above.expire_time, above.HasField("expire_time")
        ), (made, above)
    await client.tunnels.DeleteTunnel(
        P.DeleteTunnelRequest(name=tunnel), metadata=cast.owner.metadata
    )
