"""The supervisor (server/workers/supervisor.py) running real loops: a step that raises is
restarted with back-off and counted, a wake ends a pause, shutdown stops then drains in
reverse order of start. Every wait is on an event, never a sleep."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from server.workers.supervisor import Backoff, Loop, Supervisor, WorkerMetrics

TIMEOUT = 5.0


class Highest(random.Random):
    """Always the top of the range, noting each ceiling asked for (full jitter, made
    deterministic)."""

    def __init__(self) -> None:
        super().__init__(0)
        self.ceilings: list[float] = []

    def uniform(self, a: float, b: float) -> float:  # noqa: ARG002 - always b
        self.ceilings.append(b)
        return b


def supervisor(rng: random.Random | None = None) -> tuple[Supervisor, CollectorRegistry]:
    registry = CollectorRegistry()
    return Supervisor(WorkerMetrics(registry), rng=rng), registry


def sample(registry: CollectorRegistry, name: str, loop: str) -> float | None:
    return registry.get_sample_value(name, {"loop": loop})


class Script:
    """A step that raises or succeeds call by call, as scripted, and signals each call."""

    def __init__(self, outcomes: str) -> None:
        self.outcomes = outcomes  # "x": raise, ".": succeed; then wait forever
        self.calls = 0
        self.called: dict[int, asyncio.Event] = {}

    def reached(self, call: int) -> asyncio.Event:
        return self.called.setdefault(call, asyncio.Event())

    async def step(self) -> float | None:
        self.calls += 1
        self.reached(self.calls).set()
        if self.calls > len(self.outcomes):
            await asyncio.Event().wait()
        if self.outcomes[self.calls - 1] == "x":
            raise RuntimeError(f"step {self.calls} failed")
        return 0.0


async def test_a_step_that_raises_is_restarted_with_backoff_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rng = Highest()
    sup, registry = supervisor(rng)
    script = Script("xxx.x.")
    loop = Loop("flaky", script.step, 60.0, backoff=Backoff(base=0.01, cap=0.03))
    with caplog.at_level(logging.ERROR, "tunnelplane.workers"):
        sup.start([loop])
        async with asyncio.timeout(TIMEOUT):
            await script.reached(7).wait()  # every scripted step ran; the loop lives on
    await sup.stop()
    # Doubling from the base, capped; a success in between starts again from the base.
    assert rng.ceilings == [0.01, 0.02, 0.03, 0.01]
    # Only the supervisor's lines: a shared test server in the same loop may log too (a slow
    # query on a busy machine).
    records = [r for r in caplog.records if r.name == "tunnelplane.workers"]
    assert [getattr(r, "retry_in", None) for r in records] == [0.01, 0.02, 0.03, 0.01]
    assert [getattr(r, "failures", None) for r in records] == [1, 2, 3, 1]
    assert all(r.exc_info is not None for r in records)  # with the traceback
    assert sample(registry, "tunnelplane_worker_errors_total", "flaky") == 4
    assert sample(registry, "tunnelplane_worker_restarts_total", "flaky") == 4
    assert sample(registry, "tunnelplane_worker_step_seconds_count", "flaky") == 2
    assert (sample(registry, "tunnelplane_worker_last_success_timestamp_seconds", "flaky") or 0) > 0


async def test_a_loop_never_failed_shows_zero_errors_and_its_success() -> None:
    sup, registry = supervisor()
    script = Script(".")
    sup.start([Loop("steady", script.step, 60.0)])
    async with asyncio.timeout(TIMEOUT):
        await script.reached(2).wait()
    await sup.stop()
    assert sample(registry, "tunnelplane_worker_errors_total", "steady") == 0
    assert sample(registry, "tunnelplane_worker_restarts_total", "steady") == 0
    assert sample(registry, "tunnelplane_worker_step_seconds_count", "steady") == 1


async def test_a_wake_ends_the_pause_and_a_step_names_its_own_pause() -> None:
    sup, _ = supervisor()
    wake = asyncio.Event()
    calls: list[asyncio.Event] = [asyncio.Event() for _ in range(4)]
    pauses = iter([0.0, None, None])  # again at once, then the (hour-long) interval

    async def step() -> float | None:
        next(e for e in calls if not e.is_set()).set()
        return next(pauses, None)

    sup.start([Loop("woken", step, 3600.0, wake=wake)])
    async with asyncio.timeout(TIMEOUT):
        await calls[1].wait()  # the second step came at once
        wake.set()
        await calls[2].wait()  # the wake ended the hour's pause
        assert not wake.is_set(), "cleared before the step"
        wake.set()
        await calls[3].wait()
    await sup.stop()


async def test_a_one_off_loop_ends_after_its_first_success() -> None:
    sup, registry = supervisor(Highest())
    script = Script("x.")
    sup.start([Loop("once", script.step, 0.0, once=True, backoff=Backoff(0.01, 0.01))])
    (task,) = [t for t in asyncio.all_tasks() if t.get_name() == "once"]  # named after it
    async with asyncio.timeout(TIMEOUT):
        await task
    assert script.calls == 2
    assert sample(registry, "tunnelplane_worker_errors_total", "once") == 1
    await sup.stop()


async def test_shutdown_stops_every_loop_then_drains_each_last_started_first(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sup, _ = supervisor()
    order: list[str] = []
    running = {name: asyncio.Event() for name in "abc"}

    def loop(name: str, drain_fails: bool = False) -> Loop:
        async def step() -> None:
            running[name].set()
            try:
                await asyncio.Event().wait()
            finally:
                order.append(f"stopped {name}")

        async def drain() -> None:
            order.append(f"drained {name}")
            if drain_fails:
                raise RuntimeError("drain failed")

        return Loop(name, step, 60.0, drain=drain)

    sup.start([loop("a"), loop("b", drain_fails=True)])
    sup.start([loop("c")])
    async with asyncio.timeout(TIMEOUT):
        for started in running.values():
            await started.wait()
    with caplog.at_level(logging.ERROR, "tunnelplane.workers"):
        await sup.stop()
    assert order == [
        "stopped c",
        "stopped b",
        "stopped a",
        "drained c",
        "drained b",
        "drained a",  # after a drain that failed
    ]
    workers = [r for r in caplog.records if r.name == "tunnelplane.workers"]
    assert [getattr(r, "loop", None) for r in workers] == ["b"]
    assert sup.names == []


async def test_two_loops_of_one_name_are_refused() -> None:
    sup, _ = supervisor()
    never: Callable[[], asyncio.Future[None]] = asyncio.get_running_loop().create_future
    sup.start([Loop("twin", never, 1.0)])
    with pytest.raises(ValueError, match="twin"):
        sup.start([Loop("twin", never, 1.0)])
    await sup.stop()


@given(
    base=st.floats(0.001, 10.0),
    cap=st.floats(0.001, 100.0),
    failures=st.integers(1, 200),
    seed=st.integers(0, 2**32),
)
def test_backoff_is_full_jitter_under_a_doubling_capped_ceiling(
    base: float, cap: float, failures: int, seed: int
) -> None:
    backoff = Backoff(base, cap)
    ceiling = backoff.ceiling(failures)
    assert ceiling == min(cap, base * 2.0 ** (failures - 1))
    assert backoff.ceiling(failures + 1) >= ceiling
    assert 0.0 <= backoff.delay(failures, random.Random(seed)) <= ceiling  # noqa: S311
