"""The dispatcher's continuous loops (``dispatch_loops``): a slow receiver slows only
itself. One endpoint's receiver holds every request until the test releases it; another
answers at once. Real database (SQLite and PostgreSQL), real HTTP, the rig of
tests/integration/test_webhook_dispatch.py; every wait is on a condition, never a sleep.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from server.domain.webhooks.model import DeliveryState
from server.workers.supervisor import Supervisor, WorkerMetrics
from server.workers.webhooks import WebhookDispatcher, dispatch_loops
from tests.conftest import Backend
from tests.helpers import eventually
from tests.integration.test_webhook_dispatch import Rig, open_rig

PER_ENDPOINT = 3


@pytest.fixture
async def rig(backend: Backend, tmp_path: Path) -> AsyncIterator[Rig]:
    async with open_rig(backend, tmp_path) as opened:
        yield opened


@asynccontextmanager
async def running(rig: Rig, dispatcher: WebhookDispatcher) -> AsyncIterator[None]:
    """The dispatcher's loops in the background, woken by every event, as the server runs
    them."""
    rig.bus.listen(dispatcher.wake)
    supervisor = Supervisor(WorkerMetrics(CollectorRegistry()))
    supervisor.start(dispatch_loops(dispatcher))
    try:
        yield
    finally:
        await supervisor.stop()


async def states(rig: Rig, webhook_id: str) -> list[DeliveryState]:
    """The states of the endpoint's deliveries, oldest first."""
    return [d.state for d in await rig.deliveries(webhook_id)]


async def test_a_held_receiver_slows_only_its_own_endpoint(rig: Rig) -> None:
    owner = await rig.user()
    slow = await rig.endpoint(owner, "/slow", ["tunnel.*"])
    fast = await rig.endpoint(owner, "/fast", ["tunnel.*"])
    rig.rx.hold("/slow")
    dispatcher = rig.dispatcher(endpoint_concurrency=PER_ENDPOINT)
    events = 8
    async with running(rig, dispatcher):
        for _ in range(events):
            await rig.emit(owner)

        async def fast_done() -> bool:
            found = await states(rig, fast.id)
            return len(found) == events and set(found) == {DeliveryState.SUCCEEDED}

        # Every fast delivery is sent and recorded while the slow receiver holds its
        # requests: no round waits for its slowest send.
        await eventually(fast_done)
        await rig.rx.wait_until(lambda _: rig.rx.active["/slow"] == PER_ENDPOINT)
        assert rig.rx.at("/slow") == []
        assert set(await states(rig, slow.id)) == {DeliveryState.PENDING}
        assert dispatcher.in_flight == PER_ENDPOINT

        rig.rx.release("/slow")

        async def slow_done() -> bool:
            return set(await states(rig, slow.id)) == {DeliveryState.SUCCEEDED}

        await eventually(slow_done)
    # The held receiver never had more than its share at once, and got every event once.
    assert rig.rx.peak["/slow"] == PER_ENDPOINT
    assert len({s.message_id for s in rig.rx.at("/slow")}) == events
    assert len(rig.rx.at("/slow")) == events
    assert len(rig.rx.at("/fast")) == events


async def test_a_stopped_dispatcher_releases_what_it_did_not_finish(rig: Rig) -> None:
    owner = await rig.user()
    slow = await rig.endpoint(owner, "/slow", ["tunnel.*"])
    rig.rx.hold("/slow")
    dispatcher = rig.dispatcher(endpoint_concurrency=2)
    async with running(rig, dispatcher):
        for _ in range(3):
            await rig.emit(owner)
        await rig.rx.wait_until(lambda _: rig.rx.active["/slow"] == 2)
    # Stopped mid-send: the two in flight are due again now (another replica sends them
    # at once, not when their leases run out), untouched otherwise.
    deliveries = await rig.deliveries(slow.id)
    assert [d.state for d in deliveries] == [DeliveryState.PENDING] * 3
    assert all(d.attempts == () for d in deliveries)
    assert all(d.next_attempt_time == rig.clock.now() for d in deliveries)
    async with rig.db(readonly=True) as uow:
        assert await uow.webhooks.next_due() == rig.clock.now()
    rig.rx.release("/slow")


async def test_one_endpoint_at_a_time_when_told(rig: Rig) -> None:
    owner = await rig.user()
    hook = await rig.endpoint(owner, "/one", ["tunnel.*"])
    for _ in range(6):
        await rig.emit(owner)  # all due before the dispatcher starts
    rig.rx.hold("/one")  # requests pile up here: the peak counts every one sent at once
    dispatcher = rig.dispatcher(endpoint_concurrency=1)
    async with running(rig, dispatcher):
        await rig.rx.wait_until(lambda _: rig.rx.active["/one"] >= 1)
        assert dispatcher.in_flight == 1
        rig.rx.release("/one")

        async def done() -> bool:
            found = await states(rig, hook.id)
            return len(found) == 6 and set(found) == {DeliveryState.SUCCEEDED}

        await eventually(done)
    assert rig.rx.peak["/one"] == 1
