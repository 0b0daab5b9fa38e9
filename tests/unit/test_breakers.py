"""Circuit breakers (server/resilience/breakers.py, on purgatory): they open after the
threshold of consecutive failures, refuse while open, let a trial through after their open
time, close on its success, show in the metrics, and an operator can reset them."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from server.resilience.breakers import (
    BreakerKind,
    BreakerOpenError,
    Breakers,
    BreakerUnknownError,
)


class DownError(Exception):
    pass


def breakers(open_for: float = 60.0) -> tuple[Breakers, CollectorRegistry]:
    registry = CollectorRegistry()
    return Breakers({"webhook": BreakerKind(3, open_for)}, registry), registry


async def fail(b: Breakers, target: str = "whk_1") -> None:
    with pytest.raises(DownError):
        async with b.guard("webhook", target):
            raise DownError


async def succeed(b: Breakers, target: str = "whk_1") -> None:
    async with b.guard("webhook", target):
        pass


def gauge(registry: CollectorRegistry, state: str) -> float | None:
    return registry.get_sample_value(
        "tunnelplane_circuit_breakers", {"kind": "webhook", "state": state}
    )


async def test_opens_after_the_threshold_of_consecutive_failures() -> None:
    b, registry = breakers()
    await fail(b)
    await fail(b)
    await succeed(b)  # a success in between starts the count again
    await fail(b)
    await fail(b)
    assert b.states() == []
    await fail(b)
    (state,) = b.states()
    assert (state.name, state.kind, state.state) == ("webhook.whk_1", "webhook", "opened")
    with pytest.raises(BreakerOpenError) as refused:
        await succeed(b)
    assert 59 < refused.value.retry_in <= 60
    # Other targets are untouched.
    await succeed(b, "whk_2")
    assert (gauge(registry, "opened"), gauge(registry, "closed")) == (1, 1)
    assert (
        registry.get_sample_value(
            "tunnelplane_circuit_breaker_transitions_total", {"kind": "webhook", "state": "opened"}
        )
        == 1
    )


async def test_a_trial_after_the_open_time_closes_it_on_success() -> None:
    b, _ = breakers(open_for=0.05)
    for _ in range(3):
        await fail(b)
    assert b.states()[0].state == "opened"
    await asyncio.sleep(0.06)  # the breaker's own clock: its open time must pass
    assert b.states()[0].state == "half-opened"  # its next call is the trial
    await succeed(b)
    assert b.states() == []


async def test_a_failed_trial_opens_it_again() -> None:
    b, _ = breakers(open_for=0.05)
    for _ in range(3):
        await fail(b)
    await asyncio.sleep(0.06)
    await fail(b)
    assert b.states()[0].state == "opened"
    with pytest.raises(BreakerOpenError):
        await succeed(b)


async def test_reset_closes_it_now() -> None:
    b, registry = breakers()
    for _ in range(3):
        await fail(b)
    after = await b.reset("webhook.whk_1")
    assert (after.state, after.failures) == ("closed", 0)
    assert b.states() == []
    await succeed(b)
    assert gauge(registry, "opened") == 0
    with pytest.raises(BreakerUnknownError):
        await b.reset("webhook.nope")


async def test_a_cancelled_call_is_not_a_failure() -> None:
    b, _ = breakers()

    async def hang() -> None:
        async with b.guard("webhook", "whk_1"):
            await asyncio.Event().wait()

    for _ in range(4):
        task = asyncio.create_task(hang())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert b.states() == []


async def test_threads_breakers_show_and_reset_with_the_others() -> None:
    registry = CollectorRegistry()
    b = Breakers({"otlp": BreakerKind(2, 60.0)}, registry)
    for _ in range(2):
        with pytest.raises(DownError), b.guard_sync("otlp"):
            raise DownError
    with pytest.raises(BreakerOpenError), b.guard_sync("otlp"):
        pass
    assert [(s.name, s.state, s.failures) for s in b.states()] == [("otlp", "opened", 2)]
    await b.reset("otlp")
    assert b.states() == []
    with b.guard_sync("otlp"):
        pass
