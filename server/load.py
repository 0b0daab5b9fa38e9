"""The load signal: calls in flight and event-loop lag, turned into a level from 0 to 1,
per-tier limit factors, and the decision to shed non-critical calls.

Lower tiers feel load first: their limits start tightening at a lower level and their
non-critical calls are shed first; critical calls are never shed. The level is smoothed,
so limits tighten within a second or two of overload and relax as it passes.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

from server.domain.identity.model import Tier

#: Level at which each tier's limits start to tighten, and at which its non-critical
#: calls are shed (anonymous callers count as free).
TIGHTEN_FROM = {Tier.FREE: 0.5, Tier.PREMIUM: 0.7, Tier.ENTERPRISE: 0.85}
SHED_FROM = {Tier.FREE: 0.8, Tier.PREMIUM: 0.9, Tier.ENTERPRISE: 0.97}
MIN_FACTOR = 0.1
SMOOTHING = 0.3


class LoadMonitor:
    """Tracks load and answers what it means for a call."""

    def __init__(
        self,
        *,
        lag_threshold: float,
        inflight_threshold: int,
        enabled: bool = True,
        interval: float = 0.05,
        synthetic: Callable[[], float] | None = None,
    ) -> None:
        self._lag_threshold = lag_threshold
        self._inflight_threshold = inflight_threshold
        self._enabled = enabled
        self._interval = interval
        #: A load source that replaces the measured one (tests, drills).
        self.synthetic = synthetic
        self.in_flight = 0
        self.lag = 0.0
        self._level = 0.0
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def level(self) -> float:
        """Load from 0 (idle) to 1 (overloaded)."""
        if not self._enabled:
            return 0.0
        if self.synthetic is not None:
            return min(1.0, max(0.0, self.synthetic()))
        return self._level

    def enter(self) -> None:
        """A call starts."""
        self.in_flight += 1

    def leave(self) -> None:
        """A call ends."""
        self.in_flight -= 1

    def factor(self, tier: Tier) -> float:
        """How much of its normal rate limit a tier gets now."""
        start = TIGHTEN_FROM[tier]
        level = self.level
        if level <= start:
            return 1.0
        pressure = (level - start) / (1 - start)
        return max(MIN_FACTOR, 1 - pressure * (1 - MIN_FACTOR))

    def factors(self) -> dict[str, float]:
        """The factor of every tier."""
        return {tier.value: round(self.factor(tier), 3) for tier in Tier}

    def sheds(self, tier: Tier, *, critical: bool) -> bool:
        """Whether a call of ``tier`` is refused now to protect the server."""
        return not critical and self.level >= SHED_FROM[tier]

    @property
    def shedding(self) -> bool:
        """Whether any non-critical calls are being shed."""
        return self.level >= min(SHED_FROM.values())

    def observe(self, lag: float) -> None:
        """Fold one event-loop lag sample (s) and the calls in flight into the level."""
        self.lag += SMOOTHING * (lag - self.lag)
        measured = max(self.lag / self._lag_threshold, self.in_flight / self._inflight_threshold)
        self._level += SMOOTHING * (min(1.0, measured) - self._level)
        if math.isclose(self._level, 0.0, abs_tol=1e-4):
            self._level = 0.0

    async def sampled(self) -> None:
        """Return after the next measurement of :meth:`sample`."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    async def sample(self) -> None:
        """Measure event-loop lag once (how much later than asked a sleep of ``interval``
        ends) and fold it into the level; the loop around it is
        :func:`server.workers.monitors.load_loop`."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.sleep(self._interval)
        self.observe(max(0.0, loop.time() - started - self._interval))
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
