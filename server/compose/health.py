"""Health: each dependency probed on an interval and published through
``grpc.health.v1`` (the fallbacks told when Redis comes and goes), and the status
``AdminService.GetSystemStatus`` reports (:class:`LiveStatus`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from grpc_health.v1._async import HealthServicer
from redis.asyncio import Redis

from server.compose.infrastructure import Infrastructure
from server.compose.limits import LimitsArea
from server.health import Check, HealthMonitor, Listener
from server.load import LoadMonitor
from server.resilience.breakers import Breakers
from server.status import Dependency, Load, State, SystemStatus
from server.storage.kv import ResilientStore
from server.storage.limiter import FallbackLimiter
from server.workers.monitors import health_loop
from server.workers.supervisor import Loop

#: (subject, calls waiting) of the rate-limit queues.
Queues = Callable[[], Sequence[tuple[str, int]]]


class LiveStatus:
    """The status now, read from the health monitor, the limiter and the load signal."""

    def __init__(
        self,
        health: HealthMonitor,
        limiter: FallbackLimiter,
        load: LoadMonitor,
        queues: Queues,
        breakers: Breakers,
    ) -> None:
        self._breakers = breakers
        self._health = health
        self._limiter = limiter
        self._load = load
        self._queues = queues

    def status(self) -> SystemStatus:
        """SERVING, DEGRADED (an optional dependency is down) or NOT_SERVING, and why."""
        health, load = self._health, self._load
        dependencies = [
            Dependency(name, s.up, name in health.optional, s.error)
            for name, s in sorted(health.dependencies.items())
        ]
        state: State = "SERVING"
        if not health.serving():  # (None: unknown; "" is always known)
            state = "NOT_SERVING"
        elif any(not d.up for d in dependencies):
            state = "DEGRADED"
        return SystemStatus(
            state,
            dependencies,
            self._limiter.backend,
            Load(
                in_flight=load.in_flight,
                loop_lag_ms=round(load.lag * 1000, 3),
                level=round(load.level, 3),
                tier_factors=load.factors(),
                shedding=load.shedding,
            ),
            self._queues(),
            self._breakers.states(),
        )


@dataclass
class HealthArea:
    """The health monitor, its servicer, and the status built on them."""

    monitor: HealthMonitor
    servicer: HealthServicer
    status: LiveStatus

    def loops(self) -> Sequence[Loop]:
        """The dependency probes."""
        return [health_loop(self.monitor)]

    async def aclose(self) -> None:
        """Nothing to release."""


def build(infra: Infrastructure, limits: LimitsArea, services: Sequence[str]) -> HealthArea:
    """Health of ``services``: each needs the database (Redis is optional: without it,
    shared state and limits fall back in-process; so is a read replica: without it, reads
    go to the primary)."""
    checks: dict[str, Check] = {"database": infra.db.ping}
    listeners: dict[str, list[Listener]] = {}
    if isinstance(infra.kv, ResilientStore):
        checks["redis"] = infra.kv.ping
        listeners["redis"] = [
            _fresh_connections(infra.redis, infra.kv, limits.limiter),
            infra.kv.set_available,
            limits.limiter.set_available,
        ]
    router = infra.db.router
    if router is not None:
        checks["database_replica"] = router.probe
        listeners["database_replica"] = [router.set_available]
    servicer = HealthServicer()
    monitor = HealthMonitor(
        servicer,
        checks,
        {name: frozenset(checks) for name in services},
        interval=infra.settings.health_interval,
        optional=frozenset({"redis", "database_replica"}),
        listeners=listeners,
    )
    stage = limits.stage
    queues: Queues = stage.queues if stage is not None else list
    return HealthArea(
        monitor, servicer, LiveStatus(monitor, limits.limiter, limits.load, queues, infra.breakers)
    )


def _fresh_connections(
    redis: Redis | None, kv: ResilientStore, limiter: FallbackLimiter
) -> Listener:
    """When Redis is back, drop the pool's connections to the Redis that went away before
    the fallbacks switch back to it (each would fail once)."""

    async def listen(up: bool, _probed_at: float) -> None:
        if up and redis is not None and (kv.degraded or limiter.backend == "memory"):
            await redis.connection_pool.disconnect()

    return listen
