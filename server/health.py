"""Health: probe each dependency on an interval and publish it through ``grpc.health.v1``.

A service is SERVING only while every dependency it needs answers; the overall status
(service name "") is SERVING only while every dependency answers, optional ones aside.
Each dependency is also published on its own, as ``tunnelplane.dependency.<name>``
(``database``, ``redis``, ``database_replica``), so that a probe (the gateway's
``/readyz``) can tell a degraded server from a healthy one. During shutdown every
status is NOT_SERVING for good. :func:`evaluate` is the pure rule; :class:`HealthMonitor`
applies it, a probe of every dependency per :meth:`~HealthMonitor.check_once` (the loop
around it is :func:`server.workers.monitors.health_loop`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

log = logging.getLogger("tunnelplane.health")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
Check = Callable[[], Awaitable[None]]
#: Each dependency's own health service name is this prefix and its name.
DEPENDENCY_PREFIX = "tunnelplane.dependency."
#: Told after each probe whether a dependency is up, and when (``time.monotonic()``) the
#: probe started: a fallback that saw a failure after that ignores an older "up".
Listener = Callable[[bool, float], Awaitable[None] | None]


def evaluate(
    up: Mapping[str, bool],
    needs: Mapping[str, frozenset[str]],
    *,
    shutting_down: bool,
    optional: frozenset[str] = frozenset(),
) -> dict[str, bool]:
    """Which services (and "" for the whole server) are serving, given dependency states.

    An ``optional`` dependency being down degrades the server (it keeps serving from a
    fallback) without making it NOT_SERVING.
    """
    if shutting_down:
        return {"": False, **dict.fromkeys(needs, False)}
    statuses = {
        service: all(up.get(dep, False) for dep in deps if dep not in optional)
        for service, deps in needs.items()
    }
    required = [dep for dep in up if dep not in optional]
    statuses[""] = all(up.get(dep, False) for dep in required) and all(statuses.values())
    return statuses


@dataclass(frozen=True, slots=True)
class DependencyStatus:
    """The last probe of one dependency."""

    up: bool
    error: str = ""


class HealthMonitor:
    """Probes dependencies and keeps the health service in step."""

    def __init__(
        self,
        servicer: HealthServicer,
        checks: Mapping[str, Check],
        needs: Mapping[str, frozenset[str]],
        *,
        interval: float,
        timeout: float = 3.0,
        optional: frozenset[str] = frozenset(),
        listeners: Mapping[str, Sequence[Listener]] | None = None,
    ) -> None:
        self.optional = optional
        #: Seconds between probes.
        self.interval = interval
        self._listeners = dict(listeners or {})
        self._servicer = servicer
        self._checks = dict(checks)
        self._needs = dict(needs)
        self._timeout = timeout
        self._status: dict[str, DependencyStatus] = {
            name: DependencyStatus(up=False, error="not checked yet") for name in checks
        }
        self._shutting_down = False
        self._changed = asyncio.Condition()

    @property
    def dependencies(self) -> dict[str, DependencyStatus]:
        """The last known state of each dependency."""
        return dict(self._status)

    def serving(self, service: str = "") -> bool | None:
        """Whether ``service`` (or the whole server, or a dependency as
        ``tunnelplane.dependency.<name>``) is serving now; None for a name it does not
        know."""
        return self._statuses().get(service)

    async def wait_for(self, dependency: str, up: bool) -> None:
        """Return once ``dependency`` was last seen ``up`` (or down)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._status[dependency].up == up)

    async def check_once(self) -> None:
        """Probe every dependency now and publish the result."""
        started = time.monotonic()
        results = await asyncio.gather(*(self._probe(c) for c in self._checks.values()))
        for name, status in zip(self._checks, results, strict=True):
            previous = self._status.get(name)
            if previous is None or previous.up != status.up:
                log.log(
                    logging.INFO if status.up else logging.WARNING,
                    "dependency %s is %s",
                    name,
                    "up" if status.up else "down",
                    extra={"dependency": name, "error": status.error},
                )
            self._status[name] = status
            for listener in self._listeners.get(name, ()):
                result = listener(status.up, started)
                if result is not None:
                    await result
        await self._publish()
        async with self._changed:
            self._changed.notify_all()

    async def shutdown(self) -> None:
        """Report NOT_SERVING everywhere from now on."""
        self._shutting_down = True
        await self._publish()
        await self._servicer.enter_graceful_shutdown()

    def _statuses(self) -> dict[str, bool]:
        up = {name: status.up for name, status in self._status.items()}
        statuses = evaluate(
            up, self._needs, shutting_down=self._shutting_down, optional=self.optional
        )
        # Each dependency on its own, for probes that want to tell DEGRADED from SERVING.
        for name, is_up in up.items():
            statuses[DEPENDENCY_PREFIX + name] = is_up and not self._shutting_down
        return statuses

    async def _publish(self) -> None:
        for service, serving in self._statuses().items():
            await self._servicer.set(service, SERVING if serving else NOT_SERVING)

    async def _probe(self, check: Check) -> DependencyStatus:
        try:
            async with asyncio.timeout(self._timeout):
                await check()
        except Exception as exc:  # noqa: BLE001 - any failure means the dependency is down
            return DependencyStatus(up=False, error=type(exc).__name__)
        return DependencyStatus(up=True)
