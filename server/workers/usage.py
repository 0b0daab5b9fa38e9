"""The usage roll-up: every replica persists, every interval, the monthly request counts
its calls saw (:class:`server.domain.limits.service.RequestUsage`). Each row only ever rises to the
figure written, so replicas need no coordination and a repeated write changes nothing."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram

from server.domain.limits.service import RequestUsage
from server.workers.supervisor import Loop


class RollupMetrics:
    """How long roll-ups take and how many rows they write."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.seconds = Histogram(
            "tunnelplane_usage_rollup_seconds",
            "Time one roll-up of monthly request counts took.",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
            registry=registry,
        )
        self.rows = Counter(
            "tunnelplane_usage_rollup_rows_total",
            "Monthly request counts written by roll-ups.",
            registry=registry,
        )
        self.failures = Counter(
            "tunnelplane_usage_rollup_failures_total",
            "Roll-ups that could not write (retried at the next interval).",
            registry=registry,
        )


class UsageRollup:
    """Writes the noted counts, one roll-up at a time, and measures it."""

    def __init__(self, usage: RequestUsage, metrics: RollupMetrics) -> None:
        self._usage = usage
        self._metrics = metrics

    async def flush(self) -> int:
        """One roll-up now; the number of rows written."""
        started = time.perf_counter()
        try:
            rows = await self._usage.flush()
        except BaseException:
            self._metrics.failures.inc()
            raise
        self._metrics.seconds.observe(time.perf_counter() - started)
        self._metrics.rows.inc(rows)
        return rows

    async def drain(self) -> None:
        """The last roll-up (the server is stopping): once the counters being restored are,
        the requests counted since the previous one."""
        await self._usage.settled()
        await self.flush()


def rollup_loop(rollup: UsageRollup, interval: float) -> Loop:
    """Roll up every ``interval`` seconds (the first one interval after start), and once
    more on the way out; a failed write keeps the counts noted for the next."""

    async def flush() -> None:
        await rollup.flush()

    return Loop("usage-rollup", flush, interval, immediately=False, drain=rollup.drain)
