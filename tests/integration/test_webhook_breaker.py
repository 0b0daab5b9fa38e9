"""A webhook endpoint's circuit breaker, with the dispatcher, a real receiver and both
databases (the rig of tests/integration/test_webhook_dispatch.py): after the threshold of
unanswered attempts its deliveries wait unsent until the breaker lets a trial through; a
4xx answer does not open it; an operator's reset sends them at once."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from server.domain.webhooks.model import DeliveryState
from server.resilience.breakers import BreakerKind, Breakers
from server.workers.webhooks import DispatchMetrics, DispatchSettings, WebhookDispatcher
from tests.conftest import Backend
from tests.integration.test_webhook_dispatch import SCHEDULE, Rig, open_rig

OPEN_FOR = 60.0


@pytest.fixture
async def rig(backend: Backend, tmp_path: Path) -> AsyncIterator[Rig]:
    async with open_rig(backend, tmp_path) as opened:
        yield opened


def dispatcher(rig: Rig, breakers: Breakers, registry: CollectorRegistry) -> WebhookDispatcher:
    settings = DispatchSettings(
        batch=100, concurrency=20, endpoint_concurrency=100, lease=30.0, poll_interval=0.05,
        schedule=SCHEDULE, disable_after=timedelta(days=5),
    )  # fmt: skip
    return WebhookDispatcher(
        rig.db, rig.sender, rig.bus, rig.clock, settings, DispatchMetrics(registry),
        random.Random(0), breakers=breakers,  # noqa: S311 - jitter
    )  # fmt: skip


async def test_an_unanswering_endpoint_is_left_alone_until_its_trial_time(rig: Rig) -> None:
    registry = CollectorRegistry()
    breakers = Breakers({"webhook": BreakerKind(3, OPEN_FOR)}, registry)
    owner = await rig.user()
    down = await rig.endpoint(owner, "/down")
    await rig.endpoint(owner, "/fine")
    rig.rx.script("/down", *[503] * 5)
    run = dispatcher(rig, breakers, registry)
    for _ in range(5):
        await rig.emit(owner)
    await rig.step(run)  # five attempts at once: all unanswered, the breaker opens
    assert len(rig.rx.at("/down")) == 5
    (state,) = breakers.states()
    assert (state.name, state.state) == (f"webhook.{down.id}", "opened")

    # The retries come due: none is sent to /down, each waits for the trial time, with
    # its attempt count unchanged; /fine's deliveries go out as usual.
    rig.clock.advance(timedelta(minutes=10))
    for _ in range(2):
        await rig.emit(owner)
    due = rig.clock.now()
    await rig.step(run)
    assert len(rig.rx.at("/down")) == 5
    assert len(rig.rx.at("/fine")) == 7
    waiting = await rig.deliveries(down.id)
    assert len(waiting) == 7
    assert all(d.state is DeliveryState.PENDING for d in waiting)
    assert sorted(d.attempt_count for d in waiting) == [0, 0, 1, 1, 1, 1, 1]
    for d in waiting:
        assert d.next_attempt_time is not None
        assert due + timedelta(seconds=OPEN_FOR - 5) < d.next_attempt_time
    breaker_open = registry.get_sample_value(
        "tunnelplane_webhook_deliveries_total", {"result": "breaker_open"}
    )
    assert breaker_open == 7
    assert (
        registry.get_sample_value("tunnelplane_webhook_deliveries_total", {"result": "retrying"})
        == 5
    )

    # The operator resets it (the receiver is back): everything due goes out.
    await breakers.reset(f"webhook.{down.id}")
    await rig.drain(run)
    assert all(d.state is DeliveryState.SUCCEEDED for d in await rig.deliveries(down.id))
    assert len(rig.rx.at("/down")) == 12
    assert breakers.states() == []


async def test_an_endpoint_that_answers_4xx_is_there_its_breaker_stays_closed(rig: Rig) -> None:
    breakers = Breakers({"webhook": BreakerKind(3, OPEN_FOR)}, CollectorRegistry())
    owner = await rig.user()
    hook = await rig.endpoint(owner, "/refuses")
    rig.rx.script("/refuses", *[400] * 5)
    run = dispatcher(rig, breakers, CollectorRegistry())
    for _ in range(5):
        await rig.emit(owner)
    await rig.step(run)
    assert len(rig.rx.at("/refuses")) == 5
    assert breakers.states() == []
    assert all(d.attempt_count == 1 for d in await rig.deliveries(hook.id))
