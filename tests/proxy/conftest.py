"""Fixtures of the proxy's tests: a local service, a test-double control plane, a proxy
instance and the agent's reverse path, all real and on loopback, in the test's process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest_asyncio

from agent.exchange import LinkSettings, ReversePath
from proxy.app import ProxyApp, ProxySettings
from proxy.peers import Peers
from proxy.web import WebSettings
from tests.helpers import eventually
from tests.proxy.fake_plane import KEY, FakePlane
from tests.proxy.local_service import LocalService

TUNNEL_ID = "tun_01jd3k0000000000000000000a"
TUNNEL = f"users/usr_01jd3k0000000000000000000u/tunnels/{TUNNEL_ID}"
OTHER_ID = "tun_01jd3k0000000000000000000b"


@dataclass
class Stack:
    """Everything between a web client and the local service."""

    local: LocalService
    plane: FakePlane
    proxy: ProxyApp
    agent: ReversePath
    client: httpx.AsyncClient

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.proxy.port}/t/{TUNNEL_ID}"

    @property
    def link(self) -> str:
        return f"127.0.0.1:{self.proxy.link_port}"


async def open_stack(
    web: WebSettings | None = None,
    link_tls: tuple[Path, Path] | None = None,
    metrics_port: int = 0,
    admin_token: str = "",
    peers: Peers | None = None,
    plane: FakePlane | None = None,
) -> Stack:
    """The whole path; ``link_tls`` (certificate and key files) puts TLS on the link."""
    local = await LocalService().start()
    if plane is None:
        plane = await FakePlane().start()
    plane.tunnels[TUNNEL_ID] = (TUNNEL, "public")
    cert, key = link_tls or (None, None)
    settings = ProxySettings(
        control_plane=f"127.0.0.1:{plane.port}", port=0, link_port=0, metrics_port=metrics_port,
        web=web or WebSettings(), link_tls_cert=cert, link_tls_key=key, admin_token=admin_token,
    )  # fmt: skip
    proxy = ProxyApp(settings, peers=peers)
    await proxy.start()
    roots = cert.read_bytes() if cert else None
    agent = ReversePath(
        LinkSettings(tunnel=TUNNEL, agent_id="a1", key=KEY, tls=bool(roots),
                     root_certificates=roots)
    )  # fmt: skip
    await agent.configure([f"127.0.0.1:{proxy.link_port}"], local.url)
    await eventually(lambda: proxy.registry.links(TUNNEL) == 1)
    client = httpx.AsyncClient(timeout=30)
    return Stack(local, plane, proxy, agent, client)


async def close_stack(stack: Stack) -> None:
    await stack.client.aclose()
    await stack.agent.stop()
    await stack.proxy.stop()
    await stack.plane.stop()
    await stack.local.close()


@pytest_asyncio.fixture
async def stack() -> AsyncIterator[Stack]:
    """The whole path with default settings."""
    opened = await open_stack()
    yield opened
    await close_stack(opened)
