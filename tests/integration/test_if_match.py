"""``If-Match`` is honoured like the etag field (AIP-154): a stale one is refused exactly as
a stale etag in the body, the query or a gRPC request is (ABORTED, 409, the same details);
a current one lets the call through; one that differs from the request's own etag is a
400."""

from __future__ import annotations

from typing import Any

import grpc
import httpx
from google.protobuf import json_format
from tunnelplane.v1 import tunnels_pb2

from tests.helpers import Client, TestUser, fails, status_of


def auth(user: TestUser, if_match: str = "") -> dict[str, str]:
    headers = {"authorization": f"Bearer {user.access_token}"}
    if if_match:
        headers["if-match"] = if_match
    return headers


def refusal(response: httpx.Response) -> tuple[int, int, list[Any]]:
    """Status, code and details of an error (without the per-request id)."""
    body = response.json()
    return response.status_code, body["code"], body["details"]


async def stale_and_current(
    client: Client, http: httpx.AsyncClient, owner: TestUser
) -> tuple[str, str, str]:
    """A tunnel's URL, an etag it had, and its etag now."""
    made = await client.tunnel(owner, description="v1")
    url = f"/v1/{made.name}"
    changed = await http.patch(url, json={"description": "v2"}, headers=auth(owner))
    assert changed.status_code == 200, changed.text
    return url, made.etag, changed.json()["etag"]


async def test_a_stale_if_match_on_update_is_refused_like_a_stale_body_etag(
    client: Client, http: httpx.AsyncClient
) -> None:
    owner = await client.new_user()
    url, stale, current = await stale_and_current(client, http, owner)
    by_header = await http.patch(url, json={"description": "x"}, headers=auth(owner, stale))
    by_body = await http.patch(url, json={"description": "x", "etag": stale}, headers=auth(owner))
    assert refusal(by_header) == refusal(by_body)
    assert by_header.status_code == 409
    assert by_header.json()["details"][0]["reason"] == "ETAG_MISMATCH"
    # The same refusal as a gRPC client sending the stale etag gets.
    error = await fails(
        client.tunnels.UpdateTunnel(
            tunnels_pb2.UpdateTunnelRequest(
                tunnel=tunnels_pb2.Tunnel(name=url[4:], description="x", etag=stale),
                update_mask={"paths": ["description"]},
            ),
            metadata=owner.metadata,
        ),
        grpc.StatusCode.ABORTED,
    )
    grpc_details = [json_format.MessageToDict(d) for d in status_of(error).details]
    assert grpc_details == by_header.json()["details"]
    # Nothing changed; the current etag goes through.
    assert (await http.get(url, headers=auth(owner))).json()["description"] == "v2"
    ok = await http.patch(url, json={"description": "v3"}, headers=auth(owner, current))
    assert ok.status_code == 200, ok.text
    assert ok.json()["description"] == "v3"


async def test_if_match_on_delete_is_the_etag_parameter(
    client: Client, http: httpx.AsyncClient
) -> None:
    owner = await client.new_user()
    url, stale, current = await stale_and_current(client, http, owner)
    by_header = await http.delete(url, headers=auth(owner, stale))
    by_query = await http.delete(url, params={"etag": stale}, headers=auth(owner))
    assert refusal(by_header) == refusal(by_query)
    assert by_header.status_code == 409
    assert (await http.get(url, headers=auth(owner))).status_code == 200
    deleted = await http.delete(url, headers=auth(owner, current))
    assert deleted.status_code == 200, deleted.text
    assert (await http.get(url, headers=auth(owner))).status_code == 404


async def test_if_match_that_differs_from_the_body_etag_is_400(
    client: Client, http: httpx.AsyncClient
) -> None:
    owner = await client.new_user()
    url, stale, current = await stale_and_current(client, http, owner)
    response = await http.patch(
        url, json={"description": "x", "etag": current}, headers=auth(owner, stale)
    )
    assert response.status_code == 400
    bad = next(d for d in response.json()["details"] if d["@type"].endswith("BadRequest"))
    assert bad["fieldViolations"][0]["field"] == "tunnel.etag"
    assert (await http.get(url, headers=auth(owner))).json()["etag"] == current


async def test_if_match_star_and_a_user_delete(client: Client, http: httpx.AsyncClient) -> None:
    user = await client.new_user()
    url = f"/v1/{user.name}"
    read = (await http.get(url, headers=auth(user))).json()
    renamed = await http.patch(url, json={"displayName": "Renamed"}, headers=auth(user, "*"))
    assert renamed.status_code == 200, renamed.text
    stale = await http.delete(url, headers=auth(user, read["etag"]))
    assert stale.status_code == 409
    assert stale.json()["details"][0]["reason"] == "ETAG_MISMATCH"
    deleted = await http.delete(url, headers=auth(user, renamed.json()["etag"]))
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["state"] == "STATE_DELETED"
