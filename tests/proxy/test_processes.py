"""The core story with real processes: ``python -m server serve`` (which runs its embedded
proxy as a child), ``python -m agent`` next to a local streaming service, and a web client
through the proxy; then the proxy is killed and comes back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import eventually
from tests.processes import ROOT, ServerProcess, child_env, run_cli, serving
from tests.proxy.local_service import LocalService

pytestmark = pytest.mark.slow
ACCOUNT = {"email": "web@example.com", "password": "a long enough password"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def setup_tunnel(api: httpx.AsyncClient, url: str) -> tuple[str, str, str]:
    """A started private tunnel to ``url``: its name, the owner's token and an agent key."""
    (await api.post("/v1/auth:register", json=ACCOUNT)).raise_for_status()
    token = (await api.post("/v1/auth:login", json=ACCOUNT)).json()["tokens"]["accessToken"]
    auth = {"Authorization": f"Bearer {token}"}
    body = {"displayName": "llm", "endpoints": [{"url": url}]}
    tunnel = (await api.post("/v1/users/me/tunnels", json=body, headers=auth)).json()["name"]
    (await api.post(f"/v1/{tunnel}:start", json={}, headers=auth)).raise_for_status()
    key = {"displayName": "agent", "scopes": ["agent.connect"], "tunnel": tunnel}
    secret = (await api.post("/v1/users/me/apiKeys", json=key, headers=auth)).json()["secret"]
    return tunnel, token, secret


@contextlib.asynccontextmanager
async def agent(grpc_port: int, tunnel: str, key: str, home: Path) -> AsyncIterator[None]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TP_")}
    env.update(HOME=str(home), TP_AGENT_KEY=key)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "--control-plane", f"127.0.0.1:{grpc_port}",
        "--tunnel", tunnel, cwd=ROOT, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 15)


def embedded_proxy_pid(server: ServerProcess) -> int:
    started = [e for e in server.log if e.get("message") == "embedded proxy started"]
    return int(started[-1]["pid"])  # type: ignore[call-overload]


async def test_a_web_client_reaches_the_local_service_through_the_embedded_proxy(
    tmp_path: Path,
) -> None:
    local = await LocalService().start()
    proxy_port, link_port = free_port(), free_port()
    env = child_env(tmp_path, TP_PROXY_PORT=str(proxy_port), TP_PROXY_LINK_PORT=str(link_port),
                    TP_RATE_LIMIT_ENABLED="false")  # fmt: skip
    assert run_cli("migrate", env=env).returncode == 0
    async with serving(env) as server:
        log = asyncio.create_task(server.follow_log())
        api = httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30)
        tunnel, token, key = await setup_tunnel(api, local.url)
        base = f"http://127.0.0.1:{proxy_port}/t/{tunnel.rsplit('/', 1)[1]}"
        web = httpx.AsyncClient(timeout=30, headers={"Authorization": f"Bearer {token}"})
        async with agent(server.grpc_port, tunnel, key, tmp_path):

            async def served() -> bool:
                try:
                    return (await web.get(base + "/echo")).status_code == 200
                except httpx.TransportError:  # the proxy is not listening (yet, or again)
                    return False

            await eventually(served, within=30, every=0.2)
            async with httpx.AsyncClient() as anonymous:
                assert (await anonymous.get(base + "/echo")).status_code == 401
            # Tokens arrive one by one, as the local service writes them.
            started = time.monotonic()
            async with web.stream("GET", base + "/api/generate?n=5&every=0.3") as response:
                assert response.headers["content-type"] == "application/x-ndjson"
                arrivals = [time.monotonic() - started async for _ in response.aiter_raw()]
            assert arrivals[0] < 0.3, arrivals
            assert arrivals[-1] - arrivals[0] > 1.0, arrivals

            os.kill(embedded_proxy_pid(server), signal.SIGKILL)  # the server restarts it
            restarted = time.monotonic()
            await eventually(lambda: len([e for e in server.log if e.get("message") ==
                                          "embedded proxy started"]) == 2, within=30)  # fmt: skip
            await eventually(served, within=30, every=0.2)
            assert time.monotonic() - restarted < 20
        await web.aclose()
        await api.aclose()
        proxy_pid = embedded_proxy_pid(server)
        server.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(server.process.wait(), 30) == 0
        log.cancel()
        with pytest.raises(ProcessLookupError):  # the server took its proxy with it
            os.kill(proxy_pid, 0)
    await local.close()
