"""JSON bodies against the real server: an enum name the contract does not have and a
non-object for a message field are 400s naming the field (the gateway runs non-strict, so
unknown fields are still ignored), and nothing is changed or created by them."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.helpers import PASSWORD, Client, TestUser, unique_email


def auth(user: TestUser) -> dict[str, str]:
    return {"authorization": f"Bearer {user.access_token}"}


def named(response: httpx.Response) -> str:
    assert response.status_code == 400, response.text
    bad = next(d for d in response.json()["details"] if d["@type"].endswith("BadRequest"))
    field: str = bad["fieldViolations"][0]["field"]
    return field


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"displayName": "x", "preferences": {"theme": "THEME_NEON"}}, "user.preferences.theme"),
        ({"preferences": {"theme": True}}, "user.preferences.theme"),
        ({"preferences": "dark"}, "user.preferences"),
        ({"preferences": {"notifications": "all"}}, "user.preferences.notifications"),
        ({"preferences": ["THEME_DARK"]}, "user.preferences"),
    ],
)
async def test_update_user_refuses_what_it_would_have_misread(
    client: Client, http: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    user = await client.new_user()
    url = f"/v1/{user.name}"
    before = (await http.get(url, headers=auth(user))).json()
    assert named(await http.patch(url, json=body, headers=auth(user))) == field
    assert (await http.get(url, headers=auth(user))).json() == before


@pytest.mark.parametrize(
    ("tunnel", "field"),
    [
        ({"config": "fast"}, "tunnel.config"),
        ({"endpoints": ["tcp://127.0.0.1:7"]}, "tunnel.endpoints[0]"),
        ({"endpoints": {"url": "tcp://127.0.0.1:7"}}, "tunnel.endpoints"),
    ],
)
async def test_create_tunnel_refuses_what_it_would_have_misread(
    client: Client, http: httpx.AsyncClient, tunnel: dict[str, Any], field: str
) -> None:
    owner = await client.new_user()
    body = {"displayName": f"json-{unique_email()[:8]}", **tunnel}
    url = f"/v1/{owner.name}/tunnels"
    assert named(await http.post(url, json=body, headers=auth(owner))) == field
    assert (await http.get(url, headers=auth(owner))).json()["tunnels"] == []


async def test_an_unknown_delivery_is_not_read_as_the_default(http: httpx.AsyncClient) -> None:
    email = unique_email("json")
    await http.post("/v1/auth:register", json={"email": email, "password": PASSWORD})
    body = {"email": email, "password": PASSWORD, "refreshTokenDelivery": "COOKIE"}
    assert named(await http.post("/v1/auth:login", json=body)) == "refreshTokenDelivery"
    # Unknown fields are still ignored (non-strict), beside a known enum name.
    body |= {"refreshTokenDelivery": "REFRESH_TOKEN_DELIVERY_BODY", "rememberMe": True}
    login = await http.post("/v1/auth:login", json=body)
    assert login.status_code == 200, login.text
    assert login.json()["tokens"]["refreshToken"]
