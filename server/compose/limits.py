"""Limits: the rate limiter (Redis, or in-process while Redis is away), the load signal,
quotas, the monthly request counts and their roll-up, the log of refused calls, and the
pipeline stage that applies them."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from server.compose.infrastructure import Infrastructure
from server.domain.identity.model import Role, Tier
from server.domain.identity.tiers import TierCatalog
from server.domain.limits.blocks import IpBlocks
from server.domain.limits.model import BlockPolicy, Bucket
from server.domain.limits.service import QuotaService, RequestUsage, ViolationLog
from server.interceptors.ratelimit import LimiterMetrics, RateLimitStage, RatePolicy
from server.load import LoadMonitor
from server.settings import Settings, networks
from server.storage.limiter import FallbackLimiter, MemoryLimiter, RedisLimiter
from server.workers.aggregates import aggregate_loops
from server.workers.monitors import load_loop
from server.workers.supervisor import Loop
from server.workers.usage import RollupMetrics, UsageRollup, rollup_loop


@dataclass
class LimitsArea:
    """What limits calls, and what counts them."""

    settings: Settings
    limiter: FallbackLimiter
    metrics: LimiterMetrics
    load: LoadMonitor
    quotas: QuotaService
    usage: RequestUsage
    usage_rollup: UsageRollup
    violations: ViolationLog
    blocks: IpBlocks
    #: None with TP_RATE_LIMIT_ENABLED=false.
    stage: RateLimitStage | None

    def loops(self) -> Sequence[Loop]:
        """Load sampling, the violations' flushes, the usage roll-up."""
        return [
            load_loop(self.load),
            *aggregate_loops(
                "violations",
                self.violations.flush,
                self.violations.prune,
                self.settings.violation_flush_interval,
            ),
            rollup_loop(self.usage_rollup, self.settings.usage_flush_interval),
        ]

    async def aclose(self) -> None:
        """Close the limiter's Redis connection."""
        await self.limiter.close()


def build(infra: Infrastructure, tiers: TierCatalog) -> LimitsArea:
    """Limits over ``infra``'s Redis and database, by the limits of ``tiers``."""
    settings, db, clock = infra.settings, infra.db, infra.clock
    metrics = LimiterMetrics(infra.registry)
    limiter = _limiter(infra, metrics)
    load = LoadMonitor(
        lag_threshold=settings.load_lag_threshold,
        inflight_threshold=settings.load_inflight_threshold,
        enabled=settings.adaptive_limits,
    )
    usage = RequestUsage(db, limiter, clock, logging.getLogger("tunnelplane.usage"))
    violations = ViolationLog(db, infra.lister, clock, logging.getLogger("tunnelplane.ratelimit"))
    stage = None
    if settings.rate_limit_enabled:
        _watch_load(metrics, load)
        stage = RateLimitStage(
            limiter,
            _policy(settings),
            load,
            violations,
            metrics,
            clock,
            logging.getLogger("tunnelplane.ratelimit"),
            usage,
        )
    return LimitsArea(
        settings,
        limiter,
        metrics,
        load,
        QuotaService(limiter, tiers, clock, db),
        usage,
        UsageRollup(usage, RollupMetrics(infra.registry)),
        violations,
        IpBlocks(limiter, db, clock),
        stage,
    )


def _limiter(infra: Infrastructure, metrics: LimiterMetrics) -> FallbackLimiter:
    """Redis's limiter, falling back to this process's while Redis is away."""
    settings = infra.settings
    shared = None
    if infra.redis is not None:
        shared = RedisLimiter(
            infra.redis,
            settings.redis_prefix,
            lease_max=settings.rate_lease_max,
            lease_ttl=settings.rate_lease_ttl,
            on_run=metrics.redis_runs.inc,
        )
    limiter = FallbackLimiter(
        shared,
        MemoryLimiter(),
        on_switch=lambda backend: metrics.use_backend(backend, switched=True),
        on_error=metrics.errors.inc,
    )
    metrics.use_backend(limiter.backend, switched=False)
    return limiter


def _policy(settings: Settings) -> RatePolicy:
    return RatePolicy(
        tiers=settings.tiers,
        ip_bucket=Bucket(settings.ip_rate_per_minute, settings.ip_burst),
        block=BlockPolicy(
            settings.ip_block_after,
            settings.ip_block_window * 1000,
            settings.ip_block_duration * 1000,
        ),
        max_wait_ms=settings.rate_queue_max_wait * 1000,
        queue_limit=settings.rate_queue_limit,
        exempt_roles=frozenset(
            Role(r.strip()) for r in settings.rate_exempt_roles.split(",") if r.strip()
        ),
        exempt_networks=networks(settings.rate_exempt_ips),
    )


def _watch_load(metrics: LimiterMetrics, load: LoadMonitor) -> None:
    """The load level and each tier's factor, read when metrics are scraped."""
    for tier in Tier:
        metrics.factor.labels(tier.value).set_function(functools.partial(load.factor, tier))
    metrics.load.set_function(lambda: load.level)
