"""Basic web access against the real server on both backends, over gRPC and the HTTP
gateway.

The tunnel's side: a user name and a write-only password, stored as an Argon2id hash and
never returned (``basic_password_set`` says there is one); updates through field masks
keep the stored password unless they give a new one, and leaving basic access drops it.
CheckTunnelAccess: only the tunnel's user name and password let a web request in, whoever
the caller (the authorization matrix's callers included); the decision says the tunnel
takes basic credentials; they count for nothing elsewhere; wrong guesses are throttled.
"""

from __future__ import annotations

from typing import Any

import grpc
import httpx
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from tunnelplane.v1 import options_pb2, proxies_pb2, tunnels_pb2

from server.app import App
from server.storage.tables import tunnels as tunnels_table
from tests.helpers import Client, TestUser, detail, eventually, fails, violations
from tests.integration.test_authorization import (
    CALLERS,
    SHARED,
    credentials_for,
    make_target,
    others,
)

P, X = tunnels_pb2, proxies_pb2
D = X.TunnelAccessDecision
Metadata = tuple[tuple[str, str], ...]
BASIC, PUBLIC = P.WEB_ACCESS_BASIC, P.WEB_ACCESS_PUBLIC
USER, SECRET = "ann", "correct horse"


def tunnel_id(tunnel: P.Tunnel) -> str:
    return tunnel.name.rsplit("/", 1)[1]


def basic_config(username: str = USER, password: str = SECRET) -> P.TunnelConfig:
    return P.TunnelConfig(web_access=BASIC, basic_username=username, basic_password=password)


async def basic_tunnel(
    client: Client, owner: TestUser, password: str = SECRET, *, start: bool = True
) -> P.Tunnel:
    """A tunnel of ``owner`` with basic access (``USER``, ``password``)."""
    created = await client.tunnel(owner, config=basic_config(password=password))
    if not start:
        return created
    return await client.tunnels.StartTunnel(
        P.StartTunnelRequest(name=created.name), metadata=owner.metadata
    )


async def stored_config(app: App, tunnel: P.Tunnel) -> dict[str, Any]:
    """The config as the database holds it."""
    async with app.db.engine.connect() as conn:
        row = await conn.execute(
            sa.select(tunnels_table.c.config).where(tunnels_table.c.id == tunnel_id(tunnel))
        )
        config: dict[str, Any] = row.scalar_one()
    return config


def patch(tunnel: P.Tunnel, *paths: str, **config: Any) -> P.UpdateTunnelRequest:
    return P.UpdateTunnelRequest(
        tunnel=P.Tunnel(name=tunnel.name, config=P.TunnelConfig(**config)),
        update_mask=field_mask_pb2.FieldMask(paths=list(paths)),
    )


# --- the tunnel's basic credentials ------------------------------------------------------


async def test_the_password_is_stored_hashed_and_never_returned(app: App, client: Client) -> None:
    owner = await client.new_user()
    tunnel = await basic_tunnel(client, owner, start=False)
    config = tunnel.config
    assert (config.web_access, config.basic_username) == (BASIC, USER)
    assert (config.basic_password, config.basic_password_set) == ("", True)
    stored = await stored_config(app, tunnel)
    assert stored["basic_username"] == USER
    assert stored["basic_password_hash"].startswith("$argon2id$")
    assert SECRET not in str(stored)
    assert "basic_password" not in stored
    found = await client.tunnels.GetTunnel(
        P.GetTunnelRequest(name=tunnel.name), metadata=owner.metadata
    )
    assert (found.config.basic_password, found.config.basic_password_set) == ("", True)


async def test_over_http_the_password_is_write_only(
    client: Client, http: httpx.AsyncClient
) -> None:
    owner = await client.new_user()
    headers = dict(owner.metadata)
    body = {
        "displayName": "basic over http",
        "config": {"webAccess": "WEB_ACCESS_BASIC", "basicUsername": USER, "basicPassword": SECRET},
    }
    created = await http.post("/v1/users/me/tunnels", json=body, headers=headers)
    assert created.status_code == 200, created.text
    config = created.json()["config"]
    assert "basicPassword" not in config
    assert (config["webAccess"], config["basicUsername"], config["basicPasswordSet"]) == (
        "WEB_ACCESS_BASIC",
        USER,
        True,
    )
    assert SECRET not in created.text
    # A tunnel sent back whole, as read (no mask), keeps its password.
    url = f"/v1/{created.json()['name']}"
    read = (await http.get(url, headers=headers)).json()
    edited = {**read, "description": "edited"}
    updated = await http.patch(url, json=edited, headers=headers)
    assert updated.status_code == 200, updated.text
    assert updated.json()["config"]["basicPasswordSet"] is True
    assert SECRET not in (await http.get(url, headers=headers)).text


async def test_updates_keep_the_stored_hash_unless_they_give_a_new_password(
    app: App, client: Client
) -> None:
    owner = await client.new_user()
    tunnel = await basic_tunnel(client, owner, start=False)
    first = (await stored_config(app, tunnel))["basic_password_hash"]
    update = client.tunnels.UpdateTunnel
    unmasked = P.TunnelConfig(web_access=BASIC, basic_username="bob", basic_password_set=True)
    cases = [
        P.UpdateTunnelRequest(  # another field
            tunnel=P.Tunnel(name=tunnel.name, description="x"),
            update_mask=field_mask_pb2.FieldMask(paths=["description"]),
        ),
        patch(tunnel, "config.basic_username", basic_username="bob"),  # the user name only
        patch(tunnel, "config", web_access=BASIC, basic_username="bob"),  # the whole config
        # No mask: what is set counts, and basic_password_set (output only) is ignored.
        P.UpdateTunnelRequest(tunnel=P.Tunnel(name=tunnel.name, config=unmasked)),
    ]
    for request in cases:
        updated = await update(request, metadata=owner.metadata)
        assert updated.config.basic_password_set, request
        assert (await stored_config(app, tunnel))["basic_password_hash"] == first, request
    changed = await update(
        patch(tunnel, "config.basic_password", basic_password="another secret"),
        metadata=owner.metadata,
    )
    assert changed.config.basic_password_set
    assert (await stored_config(app, tunnel))["basic_password_hash"] not in ("", first)


async def test_leaving_basic_access_drops_the_credentials(app: App, client: Client) -> None:
    owner = await client.new_user()
    tunnel = await basic_tunnel(client, owner, start=False)
    update = client.tunnels.UpdateTunnel
    # The user name goes in the same update, as an allowlist's networks do.
    stale = update(patch(tunnel, "config.web_access", web_access=PUBLIC), metadata=owner.metadata)
    error = await fails(stale, grpc.StatusCode.INVALID_ARGUMENT)
    assert set(violations(error)) == {"tunnel.config.basic_username"}
    public = await update(
        patch(tunnel, "config.web_access", "config.basic_username", web_access=PUBLIC),
        metadata=owner.metadata,
    )
    config = public.config
    assert (config.web_access, config.basic_username, config.basic_password_set) == (
        PUBLIC,
        "",
        False,
    )
    stored = await stored_config(app, tunnel)
    assert (stored["basic_username"], stored["basic_password_hash"]) == ("", "")
    # Coming back needs a password again: the old one is gone.
    back = update(
        patch(tunnel, "config.web_access", "config.basic_username", web_access=BASIC,
              basic_username=USER),
        metadata=owner.metadata,
    )  # fmt: skip
    error = await fails(back, grpc.StatusCode.INVALID_ARGUMENT)
    assert violations(error) == {
        "tunnel.config.basic_password": "is required to make the tunnel BASIC"
    }


async def test_bad_basic_credentials_are_refused_naming_each_field(client: Client) -> None:
    owner = await client.new_user()
    bad = basic_config(username="ann:lee", password="short")
    error = await fails(client.tunnel(owner, config=bad), grpc.StatusCode.INVALID_ARGUMENT)
    assert set(violations(error)) == {
        "tunnel.config.basic_username",
        "tunnel.config.basic_password",
    }
    no_password = basic_config(password="")
    error = await fails(client.tunnel(owner, config=no_password), grpc.StatusCode.INVALID_ARGUMENT)
    assert set(violations(error)) == {"tunnel.config.basic_password"}
    public = P.TunnelConfig(web_access=PUBLIC, basic_password=SECRET)
    error = await fails(client.tunnel(owner, config=public), grpc.StatusCode.INVALID_ARGUMENT)
    assert set(violations(error)) == {"tunnel.config.basic_password"}


# --- CheckTunnelAccess -------------------------------------------------------------------


async def check(
    client: Client,
    tunnel: P.Tunnel | str,
    username: str = "",
    password: str = "",
    metadata: Metadata = (),
    client_ip: str = "198.51.100.7",
) -> Any:
    """The decision for a web request to ``tunnel`` with these basic credentials."""
    request = X.CheckTunnelAccessRequest(
        tunnel_id=tunnel if isinstance(tunnel, str) else tunnel_id(tunnel),
        client_ip=client_ip,
        basic_username=username,
        basic_password=password,
    )
    return await client.proxies.CheckTunnelAccess(request, metadata=metadata)


def said(decision: Any) -> tuple[bool, int, str, bool]:
    return (decision.allowed, decision.refusal, decision.tunnel, decision.basic_auth)


async def test_a_basic_tunnel_lets_in_only_its_user_name_and_password(client: Client) -> None:
    owner = await client.new_user()
    tunnel = await basic_tunnel(client, owner)
    let_in = (True, D.REFUSAL_UNSPECIFIED, tunnel.name, True)
    asked = (False, D.REFUSAL_UNAUTHENTICATED, "", True)
    assert said(await check(client, tunnel, USER, SECRET)) == let_in
    assert (await check(client, tunnel, USER, SECRET)).cache_for.seconds == 5
    assert said(await check(client, tunnel)) == asked  # none: the browser is to ask
    assert said(await check(client, tunnel, USER, "correct horsE")) == asked
    assert said(await check(client, tunnel, "Ann", SECRET)) == asked
    # The owner's own token opens nothing here: the basic credentials decide alone.
    assert said(await check(client, tunnel, metadata=owner.metadata)) == asked
    assert said(await check(client, tunnel, USER, SECRET, owner.metadata)) == let_in
    # The address does not matter, nor its absence.
    assert said(await check(client, tunnel, USER, SECRET, client_ip="")) == let_in


async def test_a_stopped_basic_tunnel_says_so_only_to_whoever_gives_its_credentials(
    client: Client,
) -> None:
    owner = await client.new_user()
    tunnel = await basic_tunnel(client, owner, start=False)
    decision = await check(client, tunnel, USER, SECRET)
    assert said(decision) == (False, D.REFUSAL_NOT_RUNNING, tunnel.name, True)
    assert said(await check(client, tunnel)) == (False, D.REFUSAL_UNAUTHENTICATED, "", True)


async def test_basic_credentials_count_for_basic_tunnels_only(client: Client) -> None:
    owner = await client.new_user()
    public = await client.tunnel(owner, config=P.TunnelConfig(web_access=PUBLIC))
    await client.tunnels.StartTunnel(
        P.StartTunnelRequest(name=public.name), metadata=owner.metadata
    )
    assert said(await check(client, public, USER, SECRET)) == (
        True,
        D.REFUSAL_UNSPECIFIED,
        public.name,
        False,  # not the proxy's to ask for, nor to strip: the local service's own
    )
    private = await client.tunnel(owner)
    decision = await check(client, private, USER, SECRET)
    assert said(decision) == (False, D.REFUSAL_UNAUTHENTICATED, "", False)
    unknown = "tun_01jd3k0000000000000000000a"
    assert said(await check(client, unknown, USER, SECRET)) == (
        False,
        D.REFUSAL_NOT_FOUND,
        "",
        False,
    )


async def test_a_new_password_replaces_the_old_one_at_once(client: Client) -> None:
    owner = await client.new_user()
    tunnel = await basic_tunnel(client, owner)
    await client.tunnels.UpdateTunnel(
        patch(tunnel, "config.basic_password", basic_password="a new secret"),
        metadata=owner.metadata,
    )
    assert not (await check(client, tunnel, USER, SECRET)).allowed
    assert (await check(client, tunnel, USER, "a new secret")).allowed


async def test_wrong_guesses_are_throttled_and_then_pass_again(client: Client) -> None:
    """After three wrong guesses at a tunnel (the sign-in throttle's policy), a guess from
    any address waits a second: RESOURCE_EXHAUSTED with RetryInfo, the right one too."""
    owner = await client.new_user()
    tunnel = await basic_tunnel(client, owner)
    for guess in ("wrong one 1", "wrong one 2", "wrong one 3"):
        decision = await check(client, tunnel, USER, guess, client_ip="203.0.113.5")
        assert decision.refusal == D.REFUSAL_UNAUTHENTICATED
    held = await fails(
        check(client, tunnel, USER, SECRET, client_ip="198.51.100.9"),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    retry = detail(held, error_details_pb2.RetryInfo)
    assert 0 < retry.retry_delay.ToTimedelta().total_seconds() <= 1

    async def admitted() -> bool:
        try:
            return bool((await check(client, tunnel, USER, SECRET)).allowed)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            return False

    await eventually(admitted, within=5, every=0.1)
    # Another tunnel was never held back.
    other = await basic_tunnel(client, owner)
    assert (await check(client, other, USER, SECRET, client_ip="203.0.113.5")).allowed


async def test_hostile_basic_credentials_are_refused_never_an_error(client: Client) -> None:
    """Whatever the user name and password hold, the answer is a decision. Over-long ones
    cost no hash and count as no guess: the two others leave the right ones unthrottled."""
    owner = await client.new_user()
    tunnel = await basic_tunnel(client, owner)
    asked = (False, D.REFUSAL_UNAUTHENTICATED, "", True)
    for username, password in [
        ("a" * 100_000, SECRET),  # over long: not a guess
        (USER, "p" * 100_000),
        (USER + "\x00", SECRET),
        ("' OR 1=1 --", SECRET + "\r\nX-Injected: 1"),
    ]:
        assert said(await check(client, tunnel, username, password)) == asked
    assert (await check(client, tunnel, USER, SECRET)).allowed


@pytest.mark.parametrize("caller", CALLERS + list(SHARED))
async def test_each_caller_of_the_authorization_matrix_needs_the_basic_credentials(
    client: Client, caller: str
) -> None:
    """Whatever credential a caller of the matrix forwards, a basic tunnel asks for its
    user name and password, and lets in with them."""
    method = X.DESCRIPTOR.services_by_name["ProxyService"].methods_by_name["CheckTunnelAccess"]
    policy = method.GetOptions().Extensions[options_pb2.policy]
    target = await make_target(client)
    await client.tunnels.UpdateTunnel(
        P.UpdateTunnelRequest(
            tunnel=P.Tunnel(name=target.tunnel, config=basic_config()),
            update_mask=field_mask_pb2.FieldMask(paths=["config"]),
        ),
        metadata=target.user.metadata,
    )
    metadata = await credentials_for(caller, client, target, policy, await others(client, caller))
    target_id = target.tunnel.rsplit("/", 1)[1]
    decision = await check(client, target_id, metadata=metadata)
    assert said(decision) == (False, D.REFUSAL_UNAUTHENTICATED, "", True)
    decision = await check(client, target_id, USER, SECRET, metadata)
    assert said(decision) == (False, D.REFUSAL_NOT_RUNNING, target.tunnel, True)


async def test_decisions_over_http(client: Client, http: httpx.AsyncClient) -> None:
    owner = await client.new_user()
    tunnel = await basic_tunnel(client, owner)
    body = {"tunnelId": tunnel_id(tunnel), "clientIp": "198.51.100.7"}
    right = {**body, "basicUsername": USER, "basicPassword": SECRET}
    answer = await http.post("/v1/tunnelAccess:check", json=right)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "allowed": True,
        "refusal": "REFUSAL_UNSPECIFIED",
        "tunnel": tunnel.name,
        "cacheFor": "5s",
        "basicAuth": True,
    }
    for wrong in (body, {**right, "basicPassword": "not it at all"}):
        answer = await http.post("/v1/tunnelAccess:check", json=wrong)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {
            "allowed": False,
            "refusal": "REFUSAL_UNAUTHENTICATED",
            "tunnel": "",
            "cacheFor": "1s",
            "basicAuth": True,
        }
    for _ in range(2):  # the second and third wrong guesses
        answer = await http.post("/v1/tunnelAccess:check", json={**right, "basicPassword": "x"})
        assert answer.json()["refusal"] == "REFUSAL_UNAUTHENTICATED", answer.text
    answer = await http.post("/v1/tunnelAccess:check", json=right)  # must wait, right or not
    assert answer.status_code == 429, answer.text
    assert int(answer.headers["retry-after"]) >= 1
