"""The usage roll-up: every replica persists, every interval, the monthly request counts
its calls saw (:class:`server.domain.limits.service.RequestUsage`). Each row only ever rises to the
figure written, so replicas need no coordination and a repeated write changes nothing."""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Histogram

from server.domain.limits.service import RequestUsage


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
    """Writes the noted counts every ``interval`` seconds."""

    def __init__(
        self,
        usage: RequestUsage,
        interval: float,
        metrics: RollupMetrics,
        log: logging.Logger,
    ) -> None:
        self._usage = usage
        self._interval = interval
        self._metrics = metrics
        self._log = log

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

    async def run(self) -> None:
        """Roll up every interval until cancelled; a failed write is retried next time."""
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.flush()
            except Exception:  # noqa: BLE001 - logged; the counts stay noted for the next try
                self._log.exception("could not persist monthly request usage; will retry")
