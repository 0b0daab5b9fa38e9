"""Tunnels: tunnels and their endpoints, shares, agents' sessions, and the background work
that keeps their health true (silent-agent sweeps, endpoint probes)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from server.compose.events import EventsArea
from server.compose.identity import IdentityArea
from server.compose.infrastructure import Infrastructure
from server.domain.common.addresses import public_only
from server.domain.tunnels.agents import AgentSessions, AgentSettings
from server.domain.tunnels.endpoints import ProbeThresholds
from server.domain.tunnels.service import TunnelService, TunnelSettings
from server.domain.tunnels.sharing import ShareService
from server.settings import Settings
from server.workers.prober import EndpointProber
from server.workers.supervisor import Loop
from server.workers.tunnels import ProbeStore, probe_loop, sweep_loop

log = logging.getLogger("tunnelplane.tunnels")


@dataclass
class TunnelsArea:
    """Everything tunnels need, built once."""

    settings: Settings
    tunnels: TunnelService
    shares: ShareService
    agents: AgentSessions
    prober: EndpointProber

    def loops(self) -> Sequence[Loop]:
        """The sweep of silent agents and the endpoint prober."""
        settings = self.settings
        return [
            sweep_loop(self.agents, max(1.0, settings.agent_heartbeat_timeout / 6)),
            probe_loop(self.prober, min(1.0, settings.probe_interval / 4)),
        ]

    async def aclose(self) -> None:
        """Nothing to release."""


def build(infra: Infrastructure, events: EventsArea, identity: IdentityArea) -> TunnelsArea:
    """Tunnels, shares and agents over ``infra``, publishing on ``events``' bus; tiers and
    the password hasher (of basic access) from ``identity``."""
    settings, db, clock = infra.settings, infra.db, infra.clock
    tunnels = TunnelService(
        db,
        events.bus,
        infra.lister,
        identity.tiers,
        clock,
        TunnelSettings(
            listen_host=settings.tunnel_listen_host,
            port_min=settings.tunnel_port_min,
            port_max=settings.tunnel_port_max,
        ),
        identity.hasher,
    )
    agents = AgentSessions(
        db,
        tunnels,
        clock,
        AgentSettings(
            heartbeat_interval=settings.agent_heartbeat_interval,
            heartbeat_timeout=settings.agent_heartbeat_timeout,
            forget_after=settings.agent_forget_after,
            stop_grace=settings.tunnel_stop_grace,
            reconnect_within=settings.agent_reconnect_within,
            proxy_links=settings.agent_proxy_links,
        ),
    )
    thresholds = ProbeThresholds(
        unhealthy_after=settings.probe_unhealthy_after,
        healthy_after=settings.probe_healthy_after,
        interval=settings.probe_interval,
        timeout=settings.probe_timeout,
    )
    prober = EndpointProber(
        ProbeStore(db, tunnels, clock, thresholds),
        log=log,
        thresholds=thresholds,
        now=clock.time,
        # Endpoints are URLs users type: in production the control plane must not become
        # their way into its own network (SSRF), so only global addresses are probed.
        allow=public_only if settings.probe_public_only else None,
    )
    return TunnelsArea(settings, tunnels, ShareService(db, infra.lister, clock), agents, prober)
