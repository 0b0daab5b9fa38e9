"""The refresh token of a cookie login reaches the browser only as ``Set-Cookie`` (which
scripts cannot read), never also as a readable ``Grpc-Metadata-*`` header: through the
embedded gateway (in-process dispatch) and through the standalone one (``python -m
gateway`` forwarding over gRPC)."""

from __future__ import annotations

import asyncio
import importlib.resources
import re
import signal
import sys
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio

from server.app import App
from tests.helpers import PASSWORD, unique_email
from tests.processes import ROOT

_LISTENING = re.compile(r"gateway listening on [\d.]+:(\d+)")
COOKIE = "tp_refresh"
ACCESS_COOKIE = "tp_access"


async def cookie_login(http: httpx.AsyncClient) -> httpx.Response:
    email = unique_email("cookie")
    registered = await http.post("/v1/auth:register", json={"email": email, "password": PASSWORD})
    assert registered.status_code == 200, registered.text
    login = await http.post(
        "/v1/auth:login",
        json={
            "email": email,
            "password": PASSWORD,
            "refreshTokenDelivery": "REFRESH_TOKEN_DELIVERY_COOKIE",
        },
    )
    assert login.status_code == 200, login.text
    return login


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


async def test_embedded_gateway_sends_the_refresh_cookie_only_as_set_cookie(
    http: httpx.AsyncClient,
) -> None:
    login = await cookie_login(http)
    token = assert_token_only_in_set_cookie(login)
    refreshed = await http.post(
        "/v1/auth:refresh", json={}, headers={"cookie": f"{COOKIE}={token}"}
    )
    assert refreshed.status_code == 200, refreshed.text
    assert_token_only_in_set_cookie(refreshed)


@pytest_asyncio.fixture
async def standalone(app: App) -> AsyncIterator[httpx.AsyncClient]:
    """``python -m gateway`` in front of the shared server's gRPC port."""
    descriptors = importlib.resources.files("tunnelplane") / "descriptors.binpb"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway",
        "--descriptor-set", str(descriptors),
        "--upstream", f"127.0.0.1:{app.grpc_port}",
        "--port", "0",
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        port = await _port(process)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            yield client
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 30)


async def _port(process: asyncio.subprocess.Process) -> int:
    assert process.stderr is not None
    async with asyncio.timeout(30):
        while line := (await process.stderr.readline()).decode():
            match = _LISTENING.search(line)
            if match:
                return int(match.group(1))
    raise AssertionError("the gateway exited before listening")


@pytest.mark.slow
async def test_standalone_gateway_sends_the_refresh_cookie_only_as_set_cookie(
    standalone: httpx.AsyncClient,
) -> None:
    login = await cookie_login(standalone)
    token = assert_token_only_in_set_cookie(login)
    refreshed = await standalone.post(
        "/v1/auth:refresh", json={}, headers={"cookie": f"{COOKIE}={token}"}
    )
    assert refreshed.status_code == 200, refreshed.text
    assert_token_only_in_set_cookie(refreshed)
