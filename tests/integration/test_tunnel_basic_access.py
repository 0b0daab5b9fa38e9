"""Basic web access against the real server on both backends, over gRPC and the HTTP
gateway.

The tunnel's side: a user name and a write-only password, stored as an Argon2id hash and
never returned (``basic_password_set`` says there is one); updates through field masks
keep the stored password unless they give a new one, and leaving basic access drops it.
"""

from __future__ import annotations

from typing import Any

import grpc
import httpx
import sqlalchemy as sa
from google.protobuf import field_mask_pb2
from tunnelplane.v1 import tunnels_pb2

from server.app import App
from server.storage.tables import tunnels as tunnels_table
from tests.helpers import Client, TestUser, fails, violations

P = tunnels_pb2
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
