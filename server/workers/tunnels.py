"""Background work for tunnels: endpoint probes (failover), and silent-agent sweeps, as
loops of the supervisor (:mod:`server.workers.supervisor`).

Both are safe on any number of replicas: a probe is claimed by moving its endpoint's next
probe time with a conditional update (one replica wins), and a sweep's updates are
idempotent.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from server.domain.common.clock import Clock
from server.domain.common.errors import DomainError
from server.domain.tunnels.agents import AgentSessions
from server.domain.tunnels.endpoints import (
    EndpointStatus,
    ProbeThresholds,
    apply_probe,
    parse_endpoint_url,
)
from server.domain.tunnels.model import Endpoint
from server.domain.tunnels.service import TunnelService
from server.domain.unit_of_work import UnitOfWorkFactory
from server.workers.prober import EndpointProber, ProbeResult, ProbeTarget
from server.workers.supervisor import Loop

log = logging.getLogger("tunnelplane.workers")


class ProbeStore:
    """The prober's view of storage: due endpoints, claimed, and their results."""

    def __init__(
        self,
        uow: UnitOfWorkFactory,
        tunnels: TunnelService,
        clock: Clock,
        thresholds: ProbeThresholds,
    ) -> None:
        self._uow = uow
        self._tunnels = tunnels
        self._clock = clock
        self._thresholds = thresholds

    async def due(self, now: float, limit: int) -> list[ProbeTarget]:
        """Endpoints whose probe is due, claimed for this replica until the next interval."""
        at = datetime.fromtimestamp(now, UTC)
        until = at + timedelta(seconds=self._thresholds.interval)
        targets: list[ProbeTarget] = []
        async with self._uow() as uow:
            for tunnel_id, url in await uow.tunnels.due_probes(at, limit):
                if not await uow.tunnels.claim_probe(tunnel_id, url, at, until):
                    continue
                try:
                    address = parse_endpoint_url(url, "url")
                except DomainError:
                    continue
                targets.append(ProbeTarget(tunnel_id, url, address))
        return targets

    async def record(self, target: ProbeTarget, result: ProbeResult, at: float) -> None:
        """Apply one result; the tunnel fails over or back if its choice changes."""
        thresholds = self._thresholds
        probed_at = datetime.fromtimestamp(at, UTC)

        def apply(endpoint: Endpoint) -> Endpoint:
            before = EndpointStatus(
                endpoint.health,
                endpoint.failures,
                endpoint.successes,
                None if endpoint.last_probe_time is None else endpoint.last_probe_time.timestamp(),
                endpoint.last_error,
            )
            after = apply_probe(before, result.ok, result.error, at, thresholds)
            return replace(
                endpoint,
                health=after.health,
                failures=after.failures,
                successes=after.successes,
                last_probe_time=probed_at,
                last_error=after.last_error,
            )

        next_probe = probed_at + timedelta(seconds=thresholds.interval)
        await self._tunnels.probed(target.tunnel_id, target.url, apply, next_probe)


def sweep_loop(agents: AgentSessions, interval: float) -> Loop:
    """Mark silent agents disconnected every ``interval`` seconds (the first sweep one
    interval after start)."""

    async def sweep() -> None:
        changed = await agents.sweep()
        if changed:
            log.info("agents swept", extra={"tunnels": changed})

    return Loop("agent-sweep", sweep, interval, immediately=False)


def probe_loop(prober: EndpointProber, poll_interval: float) -> Loop:
    """Probe whatever endpoints are due every ``poll_interval`` seconds."""
    if poll_interval <= 0:
        raise ValueError("poll_interval must be positive")

    async def probe() -> None:
        await prober.run_once()

    return Loop("prober", probe, poll_interval)
