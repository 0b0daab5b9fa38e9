"""ProxyService against the real server on both backends.

CheckTunnelAccess: every decision a streaming proxy can get — unknown tunnels, public,
IP-allowlisted and private tunnels, who may use a private one (owner, share holders, keys
with and without ``tunnels.use``, agent keys, administrators), a tunnel that is not
running — over gRPC, and the main ones over the HTTP gateway. AuthorizeAgentLink: the same
answers Connect gives an agent key for a tunnel. And a tunnel's web access itself:
normalized on create, updated through field masks, private for configs stored before it
existed.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import httpx
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2, timestamp_pb2
from tunnelplane.v1 import auth_pb2, common_pb2, options_pb2, proxies_pb2, tunnels_pb2

from server.app import App
from server.domain.identity.model import Role, Tier
from server.storage.tables import tunnels as tunnels_table
from tests.helpers import (
    Agent,
    Client,
    TestUser,
    agent_key,
    bearer,
    eventually,
    fails,
    reason,
    violations,
)
from tests.integration.test_authorization import (
    CALLERS,
    SHARED,
    credentials_for,
    make_target,
    others,
)

X = proxies_pb2
D = X.TunnelAccessDecision
P = tunnels_pb2
PRIVATE, PUBLIC, ALLOWLIST = (
    P.WEB_ACCESS_PRIVATE,
    P.WEB_ACCESS_PUBLIC,
    P.WEB_ACCESS_IP_ALLOWLIST,
)
Metadata = tuple[tuple[str, str], ...]


def tunnel_id(tunnel: P.Tunnel) -> str:
    return tunnel.name.rsplit("/", 1)[1]


async def check(
    client: Client, tunnel: P.Tunnel | str, metadata: Metadata = (), client_ip: str = ""
) -> Any:
    """The decision for a web request to ``tunnel`` (or a raw id) with ``metadata``."""
    request = X.CheckTunnelAccessRequest(
        tunnel_id=tunnel if isinstance(tunnel, str) else tunnel_id(tunnel), client_ip=client_ip
    )
    return await client.proxies.CheckTunnelAccess(request, metadata=metadata)


def allowed(decision: Any, tunnel: P.Tunnel) -> bool:
    return (decision.allowed, decision.refusal, decision.tunnel, decision.cache_for.seconds) == (
        True,
        D.REFUSAL_UNSPECIFIED,
        tunnel.name,
        5,
    )


def refused(decision: Any, refusal: int, tunnel: str = "") -> bool:
    """Refused for ``refusal``, naming ``tunnel`` (a caller who may not know it: none)."""
    return (decision.allowed, decision.refusal, decision.tunnel, decision.cache_for.seconds) == (
        False,
        refusal,
        tunnel,
        1,
    )


async def made(
    client: Client,
    owner: TestUser,
    web_access: int = 0,
    networks: tuple[str, ...] = (),
    *,
    start: bool = True,
) -> P.Tunnel:
    """A tunnel of ``owner`` with this web access, started unless told otherwise."""
    config = P.TunnelConfig(web_access=web_access, allowed_networks=list(networks))
    created = await client.tunnel(owner, config=config)
    if not start:
        return created
    return await client.tunnels.StartTunnel(
        P.StartTunnelRequest(name=created.name), metadata=owner.metadata
    )


async def key(client: Client, owner: TestUser, *scopes: str) -> Metadata:
    return bearer(await client.api_key(owner, list(scopes)))


async def share(
    client: Client, owner: TestUser, tunnel: P.Tunnel, grantee: TestUser, **fields: Any
) -> P.TunnelShare:
    fields.setdefault("role", common_pb2.SHARE_ROLE_READ)
    return await client.tunnels.CreateTunnelShare(
        P.CreateTunnelShareRequest(
            parent=tunnel.name, share=P.TunnelShare(grantee=grantee.name, **fields)
        ),
        metadata=owner.metadata,
    )


# --- CheckTunnelAccess -------------------------------------------------------------------


@pytest.mark.parametrize(
    "unknown",
    [
        "",
        "nope",
        "tun_01jd3k0000000000000000000a",  # well formed, no such tunnel
        "usr_01jd3k0000000000000000000a",  # another kind of id
        "TUN_01JD3K0000000000000000000A",
        "tun_" + "x" * 20_000,
        "../tun_01jd3k0000000000000000000a",
    ],
)
async def test_an_unknown_or_malformed_tunnel_is_not_found_for_everyone(
    client: Client, unknown: str
) -> None:
    owner = await client.new_user()
    for metadata in ((), owner.metadata, await key(client, owner, "tunnels.use")):
        assert refused(await check(client, unknown, metadata), D.REFUSAL_NOT_FOUND)


async def test_a_public_tunnel_lets_anyone_in(client: Client) -> None:
    owner, stranger = await client.new_user(), await client.new_user()
    tunnel = await made(client, owner, PUBLIC)
    for metadata in (
        (),
        owner.metadata,
        stranger.metadata,
        await key(client, stranger, "profile.read"),  # a credential need not hold tunnels.use
        bearer(await agent_key(client, stranger)),
    ):
        assert allowed(await check(client, tunnel, metadata, "198.51.100.1"), tunnel)


async def test_an_allowlist_lets_in_only_addresses_in_its_networks(client: Client) -> None:
    owner = await client.new_user()
    tunnel = await made(client, owner, ALLOWLIST, ("10.1.2.3/16", "2001:db8::/32", "203.0.113.7"))
    assert list(tunnel.config.allowed_networks) == [
        "10.1.0.0/16",  # host bits cleared
        "2001:db8::/32",
        "203.0.113.7/32",  # an address is a network of one
    ]
    for inside in ("10.1.0.1", "10.1.255.254", "::ffff:10.1.9.9", "2001:db8::42", "203.0.113.7"):
        assert allowed(await check(client, tunnel, client_ip=inside), tunnel), inside
    for outside in ("10.2.0.1", "203.0.113.8", "2001:db9::1", "::1", ""):
        decision = await check(client, tunnel, client_ip=outside)
        assert refused(decision, D.REFUSAL_FORBIDDEN), outside
    # The address decides alone: the owner's own credential does not open it from outside.
    assert refused(await check(client, tunnel, owner.metadata, "10.2.0.1"), D.REFUSAL_FORBIDDEN)
    assert allowed(await check(client, tunnel, owner.metadata, "10.1.0.1"), tunnel)


async def test_a_private_tunnel_needs_a_credential_that_may_use_it(client: Client) -> None:
    owner = await client.new_user()
    tunnel = await made(client, owner)  # private by default
    assert tunnel.config.web_access == PRIVATE
    assert refused(await check(client, tunnel), D.REFUSAL_UNAUTHENTICATED)
    for metadata in (
        owner.metadata,
        await key(client, owner),  # the owner's whole role
        await key(client, owner, "tunnels.use"),
    ):
        assert allowed(await check(client, tunnel, metadata, "198.51.100.1"), tunnel)
    for metadata in (
        await key(client, owner, "tunnels.read", "tunnels.write"),  # no tunnels.use
        bearer(await agent_key(client, owner)),  # an agent key carries, it does not use
    ):
        assert refused(await check(client, tunnel, metadata), D.REFUSAL_FORBIDDEN)


async def test_a_private_tunnel_is_not_there_for_others_administrators_included(
    client: Client,
) -> None:
    owner, stranger = await client.new_user(), await client.new_user()
    admin = await client.new_user(role=Role.SUPER_ADMIN, tag="admin")
    tunnel = await made(client, owner)
    for metadata in (
        stranger.metadata,
        await key(client, stranger, "tunnels.use"),
        admin.metadata,  # no bypass: the tunnel is its owner's data plane
        await key(client, admin),
    ):
        assert refused(await check(client, tunnel, metadata), D.REFUSAL_NOT_FOUND)


async def test_a_share_of_any_role_lets_its_holder_in_until_it_ends(client: Client) -> None:
    owner = await client.new_user(tier=Tier.PREMIUM)
    reader, admin_holder, lapsing = [await client.new_user() for _ in range(3)]
    tunnel = await made(client, owner)
    granted = await share(client, owner, tunnel, reader, role=common_pb2.SHARE_ROLE_READ)
    await share(client, owner, tunnel, admin_holder, role=common_pb2.SHARE_ROLE_ADMIN)
    soon = timestamp_pb2.Timestamp()
    soon.FromDatetime(datetime.now(UTC) + timedelta(seconds=1))
    await share(client, owner, tunnel, lapsing, expire_time=soon)

    for metadata in (
        reader.metadata,
        await key(client, reader, "tunnels.use"),
        admin_holder.metadata,
        lapsing.metadata,
    ):
        assert allowed(await check(client, tunnel, metadata), tunnel)
    # A share holder's credential still needs tunnels.use.
    no_use = await key(client, reader, "tunnels.read")
    assert refused(await check(client, tunnel, no_use), D.REFUSAL_FORBIDDEN)

    async def lapsed() -> bool:  # on the server's clock
        return refused(await check(client, tunnel, lapsing.metadata), D.REFUSAL_NOT_FOUND)

    await eventually(lapsed, within=5, every=0.05)
    await client.tunnels.DeleteTunnelShare(
        P.DeleteTunnelShareRequest(name=granted.name), metadata=owner.metadata
    )
    assert refused(await check(client, tunnel, reader.metadata), D.REFUSAL_NOT_FOUND)


async def test_not_running_is_said_only_to_callers_who_would_be_let_in(
    app: App, client: Client
) -> None:
    owner, stranger = await client.new_user(tier=Tier.PREMIUM), await client.new_user()
    holder = await client.new_user()
    private = await made(client, owner, start=False)
    await share(client, owner, private, holder)
    for metadata in (owner.metadata, holder.metadata):
        decision = await check(client, private, metadata)
        assert refused(decision, D.REFUSAL_NOT_RUNNING, private.name)
    assert refused(await check(client, private), D.REFUSAL_UNAUTHENTICATED)
    assert refused(await check(client, private, stranger.metadata), D.REFUSAL_NOT_FOUND)
    public = await made(client, owner, PUBLIC, start=False)
    assert refused(await check(client, public), D.REFUSAL_NOT_RUNNING, public.name)
    listed = await made(client, owner, ALLOWLIST, ("10.0.0.0/8",), start=False)
    assert refused(
        await check(client, listed, client_ip="10.0.0.1"), D.REFUSAL_NOT_RUNNING, listed.name
    )
    assert refused(await check(client, listed, client_ip="11.0.0.1"), D.REFUSAL_FORBIDDEN)

    # Started, then stopped by its owner; or failed (the system stopped it).
    await client.tunnels.StartTunnel(
        P.StartTunnelRequest(name=public.name), metadata=owner.metadata
    )
    assert allowed(await check(client, public), public)
    await client.tunnels.StopTunnel(P.StopTunnelRequest(name=public.name), metadata=owner.metadata)
    assert refused(await check(client, public), D.REFUSAL_NOT_RUNNING, public.name)
    await client.tunnels.StartTunnel(
        P.StartTunnelRequest(name=public.name), metadata=owner.metadata
    )
    await app.tunnels.tunnels.fail(owner.id, tunnel_id(public), "the test failed it")
    assert refused(await check(client, public), D.REFUSAL_NOT_RUNNING, public.name)


async def test_a_malformed_client_address_is_invalid_argument(client: Client) -> None:
    owner = await client.new_user()
    tunnel = await made(client, owner, PUBLIC)
    for bad in ("10.0.0.256", "10.0.0.0/8", "localhost", "10.0.0.1:80", "1" * 1000):
        error = await fails(check(client, tunnel, client_ip=bad), grpc.StatusCode.INVALID_ARGUMENT)
        assert "client_ip" in violations(error)
    # A zone says nothing about the address: fe80::1%eth0 is fe80::1.
    assert allowed(await check(client, tunnel, client_ip="fe80::1%eth0"), tunnel)


async def test_a_bad_credential_is_refused_not_decided(client: Client) -> None:
    owner = await client.new_user()
    tunnel = await made(client, owner, PUBLIC)
    for secret in ("garbage", "tp_" + "A" * 38, owner.refresh_token):
        error = await fails(check(client, tunnel, bearer(secret)), grpc.StatusCode.UNAUTHENTICATED)
        assert reason(error)


@pytest.mark.parametrize("caller", CALLERS + list(SHARED))
async def test_each_caller_of_the_authorization_matrix_gets_its_decision(
    client: Client, caller: str
) -> None:
    """The matrix lets every caller call CheckTunnelAccess (it is public); what each is
    told about the matrix's target, a private tunnel that is not started."""
    method = proxies_pb2.DESCRIPTOR.services_by_name["ProxyService"].methods_by_name[
        "CheckTunnelAccess"
    ]
    policy = method.GetOptions().Extensions[options_pb2.policy]
    assert policy.access == options_pb2.ACCESS_PUBLIC
    target = await make_target(client)
    metadata = await credentials_for(caller, client, target, policy, await others(client, caller))
    decision = await check(client, target.tunnel.rsplit("/", 1)[1], metadata)
    expected = {
        "anonymous": (D.REFUSAL_UNAUTHENTICATED, ""),
        "cookie_only": (D.REFUSAL_UNAUTHENTICATED, ""),  # the cookie is for watches only
        "other_user": (D.REFUSAL_NOT_FOUND, ""),
        "admin": (D.REFUSAL_NOT_FOUND, ""),
        "agent_key": (D.REFUSAL_FORBIDDEN, ""),
    }.get(caller, (D.REFUSAL_NOT_RUNNING, target.tunnel))  # the owner's, and share holders
    assert (decision.allowed, decision.refusal, decision.tunnel) == (False, *expected)


# --- web access in the tunnel's config ---------------------------------------------------


def patch(tunnel: P.Tunnel, *paths: str, **config: Any) -> P.UpdateTunnelRequest:
    return P.UpdateTunnelRequest(
        tunnel=P.Tunnel(name=tunnel.name, config=P.TunnelConfig(**config)),
        update_mask=field_mask_pb2.FieldMask(paths=list(paths)),
    )


async def test_web_access_changes_through_field_masks(client: Client) -> None:
    owner = await client.new_user()
    tunnel = await made(client, owner)
    assert tunnel.config.web_access == PRIVATE
    update = client.tunnels.UpdateTunnel

    public = await update(
        patch(tunnel, "config.web_access", web_access=PUBLIC), metadata=owner.metadata
    )
    assert (public.config.web_access, list(public.config.allowed_networks)) == (PUBLIC, [])
    assert allowed(await check(client, tunnel), tunnel)

    # An allowlist needs its networks in the same update.
    alone = update(
        patch(tunnel, "config.web_access", web_access=ALLOWLIST), metadata=owner.metadata
    )
    error = await fails(alone, grpc.StatusCode.INVALID_ARGUMENT)
    assert "tunnel.config.allowed_networks" in violations(error)
    listed = await update(
        patch(
            tunnel,
            "config.web_access",
            "config.allowed_networks",
            web_access=ALLOWLIST,
            allowed_networks=["192.0.2.0/24", "192.0.2.9", "192.0.2.0/24"],
        ),
        metadata=owner.metadata,
    )
    assert list(listed.config.allowed_networks) == ["192.0.2.0/24", "192.0.2.9/32"]
    assert listed.config.idle_timeout.seconds == 60  # the rest of the config is kept
    assert allowed(await check(client, tunnel, client_ip="192.0.2.77"), tunnel)
    assert refused(await check(client, tunnel, client_ip="192.0.3.1"), D.REFUSAL_FORBIDDEN)

    # Leaving the allowlist means clearing its networks too.
    stale = update(patch(tunnel, "config.web_access", web_access=PUBLIC), metadata=owner.metadata)
    error = await fails(stale, grpc.StatusCode.INVALID_ARGUMENT)
    assert "tunnel.config.allowed_networks" in violations(error)
    # Unset (UNSPECIFIED) is private, and always reads back as PRIVATE.
    private = await update(
        patch(tunnel, "config.web_access", "config.allowed_networks"), metadata=owner.metadata
    )
    assert (private.config.web_access, list(private.config.allowed_networks)) == (PRIVATE, [])
    assert refused(await check(client, tunnel), D.REFUSAL_UNAUTHENTICATED)


async def test_a_config_stored_before_web_access_existed_is_private(
    app: App, client: Client
) -> None:
    owner = await client.new_user()
    tunnel = await made(client, owner, PUBLIC)
    old = {"max_connections": 0, "idle_timeout": 60.0, "compression": False}
    async with app.db.engine.begin() as conn:
        await conn.execute(
            sa.update(tunnels_table)
            .where(tunnels_table.c.id == tunnel_id(tunnel))
            .values(config=old)
        )
    found = await client.tunnels.GetTunnel(
        P.GetTunnelRequest(name=tunnel.name), metadata=owner.metadata
    )
    assert (found.config.web_access, list(found.config.allowed_networks)) == (PRIVATE, [])
    assert refused(await check(client, tunnel), D.REFUSAL_UNAUTHENTICATED)
    assert allowed(await check(client, tunnel, owner.metadata), tunnel)


# --- AuthorizeAgentLink ------------------------------------------------------------------


async def authorize(client: Client, name: str, metadata: Metadata) -> Any:
    return await client.proxies.AuthorizeAgentLink(
        X.AuthorizeAgentLinkRequest(tunnel=name), metadata=metadata
    )


async def bound_key(client: Client, owner: TestUser, tunnel: P.Tunnel) -> str:
    created = await client.auth.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(
            parent=owner.name,
            api_key=auth_pb2.ApiKey(display_name="b", scopes=["agent.connect"], tunnel=tunnel.name),
        ),
        metadata=owner.metadata,
    )
    return created.secret


async def hello_code(client: Client, secret: str, name: str) -> tuple[grpc.StatusCode, str]:
    """What Connect answers the agent key ``secret`` saying hello for ``name``."""
    agent = Agent(client.agents, secret, name)
    try:
        await agent.hello()
    except grpc.aio.AioRpcError as error:
        return error.code(), reason(error)
    finally:
        agent.stream.cancel()
    return grpc.StatusCode.OK, ""


async def test_an_agent_key_may_link_for_the_tunnels_it_may_carry(client: Client) -> None:
    owner = await client.new_user()
    tunnel, other = await made(client, owner, start=False), await made(client, owner, start=False)
    secret = await agent_key(client, owner)
    grant = await authorize(client, tunnel.name, bearer(secret))
    assert (grant.tunnel, grant.cache_for.seconds) == (tunnel.name, 30)
    mine = f"users/me/tunnels/{tunnel_id(tunnel)}"
    assert (await authorize(client, mine, bearer(secret))).tunnel == tunnel.name
    bound = await bound_key(client, owner, tunnel)
    assert (await authorize(client, tunnel.name, bearer(bound))).tunnel == tunnel.name
    error = await fails(
        authorize(client, other.name, bearer(bound)), grpc.StatusCode.PERMISSION_DENIED
    )
    assert reason(error) == "KEY_BOUND_TO_ANOTHER_TUNNEL"


async def test_an_agent_link_is_refused_as_connect_refuses_the_same_key(client: Client) -> None:
    owner, stranger = await client.new_user(), await client.new_user()
    tunnel, other = await made(client, owner, start=False), await made(client, owner, start=False)
    unknown = f"{owner.name}/tunnels/tun_01jd3k0000000000000000000a"
    cases = [
        (await agent_key(client, stranger), tunnel.name, "NOT_OWNER"),
        (await bound_key(client, owner, other), tunnel.name, "KEY_BOUND_TO_ANOTHER_TUNNEL"),
        (await client.api_key(owner), tunnel.name, "PERMISSION_MISSING"),  # not an agent key
        (await agent_key(client, owner), unknown, "NOT_FOUND"),
    ]
    for secret, name, why in cases:
        try:
            await authorize(client, name, bearer(secret))
            raise AssertionError(f"{why}: allowed")
        except grpc.aio.AioRpcError as error:
            linked = (error.code(), reason(error))
        assert linked == await hello_code(client, secret, name), why
        assert linked[1] == why
    # Not an API key at all: refused by the policy before any of that.
    await fails(authorize(client, tunnel.name, owner.metadata), grpc.StatusCode.PERMISSION_DENIED)
    await fails(authorize(client, tunnel.name, ()), grpc.StatusCode.UNAUTHENTICATED)


# --- over HTTP ---------------------------------------------------------------------------


async def test_decisions_and_grants_over_http(client: Client, http: httpx.AsyncClient) -> None:
    owner = await client.new_user()
    public, private = await made(client, owner, PUBLIC), await made(client, owner)
    body = {"tunnelId": tunnel_id(public), "clientIp": "198.51.100.7"}
    answer = await http.post("/v1/tunnelAccess:check", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "allowed": True,
        "refusal": "REFUSAL_UNSPECIFIED",
        "tunnel": public.name,
        "cacheFor": "5s",
        "basicAuth": False,
    }
    body = {"tunnelId": tunnel_id(private)}
    anonymous = await http.post("/v1/tunnelAccess:check", json=body)
    assert anonymous.status_code == 200, anonymous.text
    assert (anonymous.json()["allowed"], anonymous.json()["refusal"]) == (
        False,
        "REFUSAL_UNAUTHENTICATED",
    )
    headers = dict(owner.metadata)
    as_owner = await http.post("/v1/tunnelAccess:check", json=body, headers=headers)
    assert (as_owner.json()["allowed"], as_owner.json()["tunnel"]) == (True, private.name)
    bad = await http.post(
        "/v1/tunnelAccess:check", json={**body, "clientIp": "not-an-ip"}, headers=headers
    )
    assert bad.status_code == 400, bad.text

    agent = dict(bearer(await agent_key(client, owner)))
    grant = await http.post(f"/v1/{private.name}:authorizeAgentLink", json={}, headers=agent)
    assert grant.status_code == 200, grant.text
    assert grant.json() == {"tunnel": private.name, "cacheFor": "30s"}
    stranger = dict(bearer(await agent_key(client, await client.new_user())))
    foreign = await http.post(f"/v1/{private.name}:authorizeAgentLink", json={}, headers=stranger)
    assert foreign.status_code == 403, foreign.text
