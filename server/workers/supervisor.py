"""The supervisor: every background loop of the server runs here, the same way.

A loop is a :class:`Loop`: a name, one step (a coroutine function doing one round of work
and returning the pause before the next round, ``None`` for the loop's interval) and its
policy. The supervisor owns everything around the step:

- **Failure.** A step that raises is logged with its traceback and counted, and the loop
  restarts after a back-off (:class:`Backoff`: exponential, full jitter, capped); the next
  step that succeeds resets it. No loop dies of an error, and none spins on one.
- **Waking.** A loop's ``wake`` event, set by whoever has new work for it, ends its pause
  early; it is cleared before each step, so work that arrives during a step brings the
  next round at once.
- **Metrics**, labelled by loop: ``tunnelplane_worker_last_success_timestamp_seconds``,
  ``tunnelplane_worker_step_seconds`` (a histogram of successful steps),
  ``tunnelplane_worker_errors_total`` and ``tunnelplane_worker_restarts_total``.
- **Shutdown** (:meth:`Supervisor.stop`), in order: first every loop stops taking new work
  (its task is cancelled, last started first), then each loop's ``drain`` runs (release
  claimed work, write what was counted), again last started first. The composition root
  starts loops in dependency order, so a loop drains before the loops it relies on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from server.errortracking import ErrorReporter, NoReporter

#: One round of a loop's work; returns the pause before the next round in seconds
#: (``0``: at once), or ``None`` for the loop's interval.
Step = Callable[[], Awaitable[float | None]]

log = logging.getLogger("tunnelplane.workers")


@dataclass(frozen=True, slots=True)
class Backoff:
    """How long a loop waits after a failed step: full jitter over an exponential that
    starts at ``base`` seconds and doubles with each failure in a row, up to ``cap``."""

    base: float = 0.1
    cap: float = 10.0

    def ceiling(self, failures: int) -> float:
        """The longest wait after ``failures`` failed steps in a row (at least one)."""
        return min(self.cap, self.base * 2.0 ** min(failures - 1, 64))

    def delay(self, failures: int, rng: random.Random) -> float:
        """A wait after ``failures`` failed steps in a row: uniform in [0, ceiling]."""
        return rng.uniform(0.0, self.ceiling(failures))


@dataclass(frozen=True, slots=True)
class Loop:
    """A background loop, as the supervisor runs it."""

    #: The ``loop`` label of its metrics and log lines.
    name: str
    step: Step
    #: Seconds between steps when the step names no pause.
    interval: float
    #: Whether the first step runs at start, or one interval later.
    immediately: bool = True
    #: Set by whoever has work for the loop: it ends the pause early.
    wake: asyncio.Event | None = None
    #: Runs once the loop has stopped taking work (see :meth:`Supervisor.stop`).
    drain: Callable[[], Awaitable[None]] | None = None
    backoff: Backoff = field(default_factory=Backoff)
    #: The loop ends after its first successful step (a one-off job at start-up).
    once: bool = False


class WorkerMetrics:
    """The metrics every loop has, labelled by its name."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.last_success = Gauge(
            "tunnelplane_worker_last_success_timestamp_seconds",
            "When the loop's last successful step ended (Unix time).",
            ["loop"],
            registry=registry,
        )
        self.step_seconds = Histogram(
            "tunnelplane_worker_step_seconds",
            "Time one successful step of the loop took.",
            ["loop"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
            registry=registry,
        )
        self.errors = Counter(
            "tunnelplane_worker_errors",
            "Steps of the loop that raised an unexpected error.",
            ["loop"],
            registry=registry,
        )
        self.restarts = Counter(
            "tunnelplane_worker_restarts",
            "Times the loop went on after a failed step, once its back-off had passed.",
            ["loop"],
            registry=registry,
        )


class Supervisor:
    """Runs loops (:meth:`start`) until :meth:`stop`; see the module docstring."""

    def __init__(
        self,
        metrics: WorkerMetrics,
        *,
        logger: logging.Logger = log,
        rng: random.Random | None = None,
        errors: ErrorReporter | None = None,
    ) -> None:
        self._metrics = metrics
        self._log = logger
        self._errors = errors or NoReporter()
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._loops: list[Loop] = []
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def names(self) -> list[str]:
        """The loops started, in order."""
        return [loop.name for loop in self._loops]

    def start(self, loops: Iterable[Loop]) -> None:
        """Start ``loops`` in order, after any started before."""
        for loop in loops:
            if loop.name in self.names:
                raise ValueError(f"a loop named {loop.name!r} is running already")
            for metric in (self._metrics.errors, self._metrics.restarts):
                metric.labels(loop.name)  # exported from the start, at zero
            self._loops.append(loop)
            self._tasks.append(asyncio.create_task(self._run(loop), name=loop.name))

    async def stop(self) -> None:
        """Every loop stops taking work (cancelled, last started first); then each
        drains, last started first. A drain that fails is logged; the others still run."""
        loops, tasks = self._loops[::-1], self._tasks[::-1]
        self._loops, self._tasks = [], []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for loop in loops:
            if loop.drain is None:
                continue
            try:
                await loop.drain()
            except Exception:  # noqa: BLE001 - logged; the other loops still drain
                self._log.exception("draining a background loop failed", extra={"loop": loop.name})

    async def _run(self, loop: Loop) -> None:
        failures = 0
        if not loop.immediately:
            await self._pause(loop, loop.interval)
        while True:
            if loop.wake is not None:
                loop.wake.clear()  # before the step: work arriving during it wakes the next
            started = time.perf_counter()
            try:
                pause = await loop.step()
            except Exception as exc:  # noqa: BLE001 - the one place a loop's failure is handled
                failures += 1
                await self._back_off(loop, failures, exc)
                continue
            failures = 0
            self._metrics.step_seconds.labels(loop.name).observe(time.perf_counter() - started)
            self._metrics.last_success.labels(loop.name).set(time.time())
            if loop.once:
                return
            await self._pause(loop, loop.interval if pause is None else pause)

    async def _back_off(self, loop: Loop, failures: int, exc: Exception) -> None:
        self._metrics.errors.labels(loop.name).inc()
        if failures == 1:  # once per run of failures, not once per retry
            self._errors.capture(exc, {"loop": loop.name})
        delay = loop.backoff.delay(failures, self._rng)
        self._log.error(
            "background loop %s failed; restarting in %.3f s",
            loop.name,
            delay,
            exc_info=exc,
            extra={"loop": loop.name, "failures": failures, "retry_in": round(delay, 3)},
        )
        await asyncio.sleep(delay)
        self._metrics.restarts.labels(loop.name).inc()

    @staticmethod
    async def _pause(loop: Loop, seconds: float) -> None:
        if seconds <= 0 or loop.wake is None:
            await asyncio.sleep(max(seconds, 0.0))
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await loop.wake.wait()
