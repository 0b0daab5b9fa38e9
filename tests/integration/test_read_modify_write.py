"""Read-modify-write of a whole resource (AIP-203, AIP-134): a tunnel or a user read back,
edited in one field and sent back whole (output-only fields, name and etag included) with
no update mask changes only that field, over HTTP and over gRPC. An explicit mask naming
an output-only field is still refused."""

from __future__ import annotations

from typing import Any

import grpc
import httpx
from tunnelplane.v1 import tunnels_pb2, users_pb2

from tests.helpers import Client, TestUser, fails, violations

#: What an update itself changes.
CHANGED_BY_AN_UPDATE = {"updateTime", "etag"}


def auth(user: TestUser) -> dict[str, str]:
    return {"authorization": f"Bearer {user.access_token}"}


def without(document: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    return {key: value for key, value in document.items() if key not in keys}


async def a_full_tunnel(client: Client, owner: TestUser) -> tunnels_pb2.Tunnel:
    """A tunnel with every updatable part set (not started: nothing changes it meanwhile)."""
    return await client.tunnel(
        owner,
        description="as created",
        config=tunnels_pb2.TunnelConfig(max_connections=3, compression=True),
        endpoints=[tunnels_pb2.TunnelEndpoint(url="tcp://127.0.0.1:7", priority=1, weight=2)],
    )


async def test_a_tunnel_sent_back_whole_over_http_changes_only_the_edit(
    client: Client, http: httpx.AsyncClient
) -> None:
    owner = await client.new_user()
    url = f"/v1/{(await a_full_tunnel(client, owner)).name}"
    read = (await http.get(url, headers=auth(owner))).json()
    # What a GET returns carries output-only fields, at the top and inside endpoints.
    assert {"state", "health", "createTime", "owner", "listenAddress"} <= read.keys()
    assert "health" in read["endpoints"][0]
    edited = {**read, "displayName": read["displayName"] + "-renamed"}
    response = await http.patch(url, json=edited, headers=auth(owner))
    assert response.status_code == 200, response.text
    updated = response.json()
    assert without(updated, CHANGED_BY_AN_UPDATE) == without(edited, CHANGED_BY_AN_UPDATE)
    assert updated["etag"] != read["etag"]
    assert (await http.get(url, headers=auth(owner))).json() == updated


async def test_a_user_sent_back_whole_over_http_changes_only_the_edit(
    client: Client, http: httpx.AsyncClient
) -> None:
    user = await client.new_user()
    url = f"/v1/{user.name}"
    read = (await http.get(url, headers=auth(user))).json()
    assert {"email", "role", "tier", "state", "createTime", "hasAvatar"} <= read.keys()
    preferences = {**read["preferences"], "theme": "THEME_DARK"}
    edited = {**read, "preferences": preferences}
    response = await http.patch(url, json=edited, headers=auth(user))
    assert response.status_code == 200, response.text
    updated = response.json()
    assert without(updated, CHANGED_BY_AN_UPDATE) == without(edited, CHANGED_BY_AN_UPDATE)
    assert (await http.get(url, headers=auth(user))).json() == updated


async def test_a_tunnel_sent_back_whole_over_grpc_changes_only_the_edit(client: Client) -> None:
    owner = await client.new_user()
    made = await a_full_tunnel(client, owner)
    read = await client.tunnels.GetTunnel(
        tunnels_pb2.GetTunnelRequest(name=made.name), metadata=owner.metadata
    )
    edited = tunnels_pb2.Tunnel()
    edited.CopyFrom(read)
    edited.description = "edited"
    updated = await client.tunnels.UpdateTunnel(
        tunnels_pb2.UpdateTunnelRequest(tunnel=edited), metadata=owner.metadata
    )
    for message in (updated, edited):
        message.ClearField("update_time")
        message.ClearField("etag")
    assert updated == edited


async def test_an_explicit_mask_naming_an_output_only_field_is_still_refused(
    client: Client, http: httpx.AsyncClient
) -> None:
    owner = await client.new_user()
    made = await a_full_tunnel(client, owner)
    url = f"/v1/{made.name}"
    read = (await http.get(url, headers=auth(owner))).json()
    response = await http.patch(f"{url}?updateMask=state", json=read, headers=auth(owner))
    assert response.status_code == 400
    bad = next(d for d in response.json()["details"] if d["@type"].endswith("BadRequest"))
    assert bad["fieldViolations"][0]["field"] == "update_mask"
    assert "'state'" in bad["fieldViolations"][0]["description"]
    error = await fails(
        client.users.UpdateUser(
            users_pb2.UpdateUserRequest(
                user=users_pb2.User(name="users/me", email="x@example.com"),
                update_mask={"paths": ["email"]},
            ),
            metadata=owner.metadata,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "update_mask" in violations(error)
