"""Basic access through the proxy, against the test-double control plane and then the real
one: a browser is asked for the tunnel's user name and password (``WWW-Authenticate:
Basic``), they go to the control plane in the check's request (never as its credential),
and the local service never sees them; other tunnels' local services get their own Basic
credentials untouched, and Bearer credentials still go as the check's credential."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
from tunnelplane.v1 import tunnels_pb2

from agent.exchange import LinkSettings, ReversePath
from proxy.app import ProxyApp, ProxySettings
from server.app import App
from tests.helpers import Client, agent_key, eventually
from tests.proxy.conftest import TUNNEL, TUNNEL_ID, Stack
from tests.proxy.fake_plane import BASIC_PASSWORD, BASIC_USER, TOKEN
from tests.proxy.local_service import LocalService

RIGHT = (BASIC_USER, BASIC_PASSWORD)
CHALLENGE = f'Basic realm="{TUNNEL_ID}", charset="UTF-8"'


def basic_header(raw: bytes) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


@pytest.fixture
def basic(stack: Stack) -> Stack:
    """The stack, with its tunnel in basic access."""
    stack.plane.tunnels[TUNNEL_ID] = (TUNNEL, "basic")
    stack.proxy.control._access.clear()
    return stack


async def test_a_browser_is_asked_for_the_user_name_and_password(basic: Stack) -> None:
    for headers in (
        {},
        basic_header(f"{BASIC_USER}:wrong password".encode()),
        basic_header(b"no colon at all"),
        basic_header(b"\xff\xfe:not utf-8"),
        {"Authorization": "Basic !!!not base64!!!"},
        {"Authorization": "Basic"},
        {"Authorization": f"Bearer {TOKEN}"},  # a Tunnelplane credential does not open it
    ):
        response = await basic.client.get(basic.base + "/echo", headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"] == CHALLENGE, headers
        assert response.json()["error"]["reason"] == "UNAUTHENTICATED"
    assert basic.local.seen_headers == []


async def test_the_right_credentials_go_in_and_never_reach_the_local_service(
    basic: Stack,
) -> None:
    response = await basic.client.get(basic.base + "/echo", auth=RIGHT)
    assert response.status_code == 200, response.text
    assert "Authorization" not in basic.local.seen_headers[-1]
    # They went in the check's request, not as its credential.
    request, authorization = basic.plane.seen[-1]
    assert (request.basic_username, request.basic_password, authorization) == (*RIGHT, "")


async def test_decisions_are_cached_per_credentials(basic: Stack) -> None:
    before = basic.plane.checks
    for _ in range(3):
        assert (await basic.client.get(basic.base + "/echo", auth=RIGHT)).status_code == 200
    assert basic.plane.checks == before + 1
    wrong = (BASIC_USER, BASIC_PASSWORD + "!")
    assert (await basic.client.get(basic.base + "/echo", auth=wrong)).status_code == 401
    assert basic.plane.checks == before + 2
    # No SHA-256 in the cache's keys is any credential's text.
    keys = list(basic.proxy.control._access._entries)
    assert all(BASIC_PASSWORD.encode() not in key[1] for key in keys)


async def test_another_tunnels_local_service_gets_its_own_basic_credentials(
    stack: Stack,
) -> None:
    """A public tunnel's local service may ask for Basic credentials of its own: the proxy
    passes them on (the control plane said they are not its business)."""
    headers = basic_header(b"local:service secret")
    response = await stack.client.get(stack.base + "/echo", headers=headers)
    assert response.status_code == 200
    assert stack.local.seen_headers[-1]["Authorization"] == headers["Authorization"]
    assert stack.plane.seen[-1][1] == ""


async def test_bearer_credentials_still_go_as_the_checks_credential(stack: Stack) -> None:
    stack.plane.tunnels[TUNNEL_ID] = (TUNNEL, "private")
    stack.proxy.control._access.clear()
    response = await stack.client.get(
        stack.base + "/echo", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert response.status_code == 200
    request, authorization = stack.plane.seen[-1]
    assert authorization == f"Bearer {TOKEN}"
    assert (request.basic_username, request.basic_password) == ("", "")
    assert "Authorization" not in stack.local.seen_headers[-1]
    challenge = (await stack.client.get(stack.base + "/echo")).headers["www-authenticate"]
    assert challenge.startswith("Bearer")


# --- against the real control plane -------------------------------------------------------


@pytest_asyncio.fixture
async def real(app: App, client: Client) -> AsyncIterator[tuple[str, LocalService]]:
    """A started basic tunnel of a new user on the test server, its agent linked to a
    proxy of its own: the tunnel's /t/ URL, and the local service."""
    owner = await client.new_user()
    config = tunnels_pb2.TunnelConfig(
        web_access=tunnels_pb2.WEB_ACCESS_BASIC,
        basic_username="ann",
        basic_password="a long secret",
    )
    tunnel = await client.tunnel(owner, config=config)
    await client.tunnels.StartTunnel(
        tunnels_pb2.StartTunnelRequest(name=tunnel.name), metadata=owner.metadata
    )
    local = await LocalService().start()
    proxy = ProxyApp(ProxySettings(control_plane=f"127.0.0.1:{app.grpc_port}", port=0,
                                   link_port=0, metrics_port=0))  # fmt: skip
    await proxy.start()
    agent = ReversePath(LinkSettings(tunnel=tunnel.name, agent_id="a1",
                                     key=await agent_key(client, owner)))  # fmt: skip
    await agent.configure([f"127.0.0.1:{proxy.link_port}"], local.url)
    await eventually(lambda: proxy.registry.links(tunnel.name) == 1)
    yield f"http://127.0.0.1:{proxy.port}/t/{tunnel.name.rsplit('/', 1)[1]}", local
    await agent.stop()
    await proxy.stop()
    await local.close()


async def test_end_to_end_with_the_real_control_plane(
    real: tuple[str, LocalService],
) -> None:
    base, local = real
    async with httpx.AsyncClient(timeout=30) as web:
        asked = await web.get(base + "/echo")
        assert asked.status_code == 401
        assert asked.headers["www-authenticate"].startswith('Basic realm="tun_')
        assert (await web.get(base + "/echo", auth=("ann", "not the secret"))).status_code == 401
        response = await web.get(base + "/echo", auth=("ann", "a long secret"))
        assert response.status_code == 200, response.text
        assert "Authorization" not in local.seen_headers[-1]
