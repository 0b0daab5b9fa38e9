"""Desired states applied to a real relay."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from agent.control import RelayController
from agent.counters import Counters
from tests.agent.fakes import (
    DesiredState,
    EchoServer,
    closed_by_peer,
    connect,
    desired,
    round_trip,
    unused_port,
)


@pytest_asyncio.fixture
async def controller(echo: EchoServer, counters: Counters) -> AsyncIterator[RelayController]:
    """A controller whose default target is the echo service."""
    owner = RelayController(counters, default_target=echo.address)
    yield owner
    await owner.stop()


async def test_started_state_relays_to_the_default_target(controller: RelayController) -> None:
    await controller.apply(desired(1))
    assert controller.relay is not None
    async with connect(controller.relay.port) as client:
        assert await round_trip(*client, b"hi") == b"hi"
    assert controller.version == 1


async def test_target_change_retargets_without_restarting(
    controller: RelayController, echo: EchoServer
) -> None:
    shouting = await EchoServer(bytes.upper).start()
    try:
        await controller.apply(desired(1))
        relay = controller.relay
        assert relay is not None
        async with connect(relay.port) as old:
            await controller.apply(desired(2, target=shouting.address, max_connections=5))
            assert controller.relay is relay
            assert relay.target == shouting.address
            assert await round_trip(*old, b"abc") == b"abc"
            async with connect(relay.port) as new:
                assert await round_trip(*new, b"abc") == b"ABC"
    finally:
        await shouting.close()


async def test_listen_address_change_restarts_the_listener(
    controller: RelayController,
) -> None:
    await controller.apply(desired(1, listen="127.0.0.1:0"))
    first = controller.relay
    assert first is not None
    old_port = first.port
    await controller.apply(desired(2, listen="localhost:0"))
    assert controller.relay is not first
    assert controller.relay is not None
    assert controller.relay.listen_address == ("localhost", 0)
    with pytest.raises(ConnectionRefusedError):
        async with connect(old_port):
            pass


async def test_stale_states_are_ignored(controller: RelayController, echo: EchoServer) -> None:
    await controller.apply(desired(5, target=echo.address))
    await controller.apply(desired(4, DesiredState.RUN_STOPPED))
    assert controller.relay is not None
    assert controller.version == 5
    await controller.apply(desired(5, DesiredState.RUN_STOPPED))
    assert controller.relay is None


async def test_listen_host_option_overrides_the_sent_host(counters: Counters) -> None:
    owner = RelayController(counters, default_target="127.0.0.1:9", listen_host="127.0.0.1")
    plan = owner.plan(desired(1, listen="0.0.0.0:7000", idle_seconds=5, max_connections=3))
    assert plan.listen == ("127.0.0.1", 7000)
    assert (plan.target, plan.idle_timeout, plan.max_connections) == ("127.0.0.1:9", 5.0, 3)
    assert owner.plan(desired(1, target="10.0.0.1:80")).target == "10.0.0.1:80"
    assert owner.plan(desired(1)).idle_timeout == 60.0


async def test_without_any_target_the_relay_does_not_start(counters: Counters) -> None:
    owner = RelayController(counters)
    await owner.apply(desired(1))
    assert owner.relay is None


async def test_a_stop_refuses_new_connections_at_once_and_closes_open_ones_after_the_grace(
    controller: RelayController, counters: Counters
) -> None:
    await controller.apply(desired(1))
    relay = controller.relay
    assert relay is not None
    port = relay.port
    loop = asyncio.get_running_loop()
    async with connect(port) as (reader, writer):
        assert await round_trip(reader, writer, b"before") == b"before"
        await controller.apply(desired(2, DesiredState.RUN_STOPPED, stop_grace=0.5))
        stopped = loop.time()
        assert (controller.relay, controller.draining) == (None, 1)
        with pytest.raises(ConnectionRefusedError):
            async with connect(port):
                pass
        assert await round_trip(reader, writer, b"in the grace") == b"in the grace"
        assert await closed_by_peer(reader)
        lasted = loop.time() - stopped
    await relay.wait_until_idle()
    assert 0.49 <= lasted < 5
    assert (counters.successes, counters.errors, counters.active) == (1, 0, 0)


async def test_a_start_during_the_grace_listens_again_at_once_and_stop_ends_everything(
    controller: RelayController,
) -> None:
    listen = f"127.0.0.1:{unused_port()}"
    port = int(listen.rsplit(":", 1)[1])
    await controller.apply(desired(1, listen=listen))
    async with connect(port) as old:
        await round_trip(*old, b"old")
        await controller.apply(desired(2, DesiredState.RUN_STOPPED, listen=listen, stop_grace=60))
        await controller.apply(desired(3, listen=listen))
        assert controller.draining == 1
        async with connect(port) as new:
            assert await round_trip(*new, b"new") == b"new"
        assert await round_trip(*old, b"still") == b"still"
        await controller.stop()  # the agent is stopping: no grace for anyone
        assert controller.draining == 0
        assert await closed_by_peer(old[0])


async def test_a_stop_without_a_grace_closes_open_connections_at_once(
    controller: RelayController,
) -> None:
    await controller.apply(desired(1))
    relay = controller.relay
    assert relay is not None
    async with connect(relay.port) as (reader, writer):
        await round_trip(reader, writer, b"x")
        await controller.apply(desired(2, DesiredState.RUN_STOPPED, stop_grace=0))
        assert await closed_by_peer(reader)
