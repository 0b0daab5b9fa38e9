"""The refresh token of a cookie login reaches the browser only as ``Set-Cookie`` (which
scripts cannot read), never also as a readable ``Grpc-Metadata-*`` header: through the
embedded gateway (in-process dispatch) and through the standalone one (``python -m
gateway`` forwarding over gRPC)."""

from __future__ import annotations

import importlib.resources
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio

from server.app import App
from tests.helpers import cookie_login
from tests.processes import gateway_serving

COOKIE = "tp_refresh"
ACCESS_COOKIE = "tp_access"


def assert_token_only_in_set_cookie(response: httpx.Response) -> str:
    """The refresh token's value; it appears in no header but its ``Set-Cookie``, nor in the
    body. (The other cookie, ``tp_access``, holds the access token the body carries too.)"""
    cookies = dict(c.split("=", 1) for c in response.headers.get_list("set-cookie"))
    assert sorted(cookies) == [ACCESS_COOKIE, COOKIE], cookies
    token = cookies[COOKIE].split(";", 1)[0]
    assert len(token) > 16
    carriers = [key for key, value in response.headers.multi_items() if token in value]
    assert carriers == ["set-cookie"], carriers
    assert token not in response.text
    assert cookies[ACCESS_COOKIE].split(";", 1)[0] == response.json()["tokens"]["accessToken"]
    return token


async def login_and_refresh(http: httpx.AsyncClient) -> None:
    """A cookie login and a refresh by cookie: neither shows the refresh token but in its
    ``Set-Cookie``."""
    login = await cookie_login(http)
    token = assert_token_only_in_set_cookie(login)
    refreshed = await http.post(
        "/v1/auth:refresh", json={}, headers={"cookie": f"{COOKIE}={token}"}
    )
    assert refreshed.status_code == 200, refreshed.text
    assert_token_only_in_set_cookie(refreshed)


async def test_embedded_gateway_sends_the_refresh_cookie_only_as_set_cookie(
    http: httpx.AsyncClient,
) -> None:
    await login_and_refresh(http)


@pytest_asyncio.fixture
async def standalone(app: App) -> AsyncIterator[httpx.AsyncClient]:
    """``python -m gateway`` in front of the shared server's gRPC port."""
    descriptors = importlib.resources.files("tunnelplane") / "descriptors.binpb"
    async with (
        gateway_serving(str(descriptors), app.grpc_port) as gateway,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.port}") as client,
    ):
        yield client


@pytest.mark.slow
async def test_standalone_gateway_sends_the_refresh_cookie_only_as_set_cookie(
    standalone: httpx.AsyncClient,
) -> None:
    await login_and_refresh(standalone)
