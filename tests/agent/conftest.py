"""Fixtures of the agent's tests: an echo service and a test-double control plane."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from agent.counters import Counters
from tests.agent.fakes import EchoServer, FakeControlPlane


@pytest_asyncio.fixture
async def echo() -> AsyncIterator[EchoServer]:
    """An echo service on a free loopback port."""
    server = await EchoServer().start()
    yield server
    await server.close()


@pytest_asyncio.fixture
async def plane() -> AsyncIterator[FakeControlPlane]:
    """A control plane on a free loopback port."""
    control_plane = await FakeControlPlane().start()
    yield control_plane
    await control_plane.stop()


@pytest.fixture
def counters() -> Counters:
    """Fresh counters."""
    return Counters()
