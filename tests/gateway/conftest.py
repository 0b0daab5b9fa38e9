"""Fixtures for the gateway's own tests: the echo upstream and a standalone gateway in
front of it over a real grpc.aio channel, both on loopback ports."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import httpx
import pytest_asyncio

from gateway.app import Gateway, GatewayOptions
from gateway.bindings import Catalog, load_descriptor_set
from gateway.forward import ChannelDispatcher
from gateway.serve import HttpServer
from tests.gateway import upstream
from tests.gateway.echo_proto import DESCRIPTOR_SET


@dataclass
class Running:
    """A gateway in front of the echo upstream."""

    gateway: Gateway
    http: httpx.AsyncClient
    upstream_port: int


@pytest_asyncio.fixture(scope="session")
async def echo_upstream() -> AsyncIterator[int]:
    """The echo gRPC server; yields its port."""
    server, port = await upstream.start()
    yield port
    await server.stop(0)


async def running(port: int, options: GatewayOptions) -> AsyncIterator[Running]:
    """A standalone gateway (private descriptor pool, channel dispatch) on a free port."""
    catalog = Catalog.build(load_descriptor_set(DESCRIPTOR_SET))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        app = Gateway(catalog, ChannelDispatcher(channel), options)
        server = HttpServer(app, "127.0.0.1", 0)
        await server.start()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            yield Running(app, client, port)
        await server.stop()


@pytest_asyncio.fixture(scope="session")
async def gw(echo_upstream: int) -> AsyncIterator[Running]:
    """The default standalone gateway."""
    options = GatewayOptions(cors_origins=frozenset({"https://app.example"}), title="Echo")
    async for value in running(echo_upstream, options):
        yield value


@pytest_asyncio.fixture(scope="session")
async def strict_gw(echo_upstream: int) -> AsyncIterator[Running]:
    """A strict gateway with a small body limit and zero values omitted."""
    options = GatewayOptions(strict=True, max_body_bytes=1024, emit_defaults=False)
    async for value in running(echo_upstream, options):
        yield value
