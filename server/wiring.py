"""Parts of the composition root (``server/app.py`` calls them): tunnels, shares, agents,
the event log and bus, webhooks and operations, and their background loops."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import timedelta

from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from server.domain.common.addresses import public_only
from server.domain.common.clock import Clock
from server.domain.common.listing import Lister
from server.domain.events.bus import MemoryBus
from server.domain.events.service import EventLog
from server.domain.identity.tiers import TierCatalog
from server.domain.operations.runner import OperationRunner
from server.domain.operations.service import OperationService
from server.domain.tunnels.agents import AgentSessions, AgentSettings
from server.domain.tunnels.endpoints import ProbeThresholds
from server.domain.tunnels.service import TunnelService, TunnelSettings
from server.domain.tunnels.sharing import ShareService
from server.domain.unit_of_work import UnitOfWorkFactory
from server.domain.webhooks.endpoints import WebhookPolicy
from server.domain.webhooks.model import REPLAY
from server.domain.webhooks.service import WebhookService
from server.settings import Settings
from server.storage.bus import RedisBus
from server.workers.prober import EndpointProber
from server.workers.tunnels import ProbeStore, sweep_loop
from server.workers.webhook_http import WebhookSender
from server.workers.webhooks import (
    DispatchMetrics,
    DispatchSettings,
    WebhookDispatcher,
    seal_plain_headers,
)

log = logging.getLogger("tunnelplane.tunnels")


@dataclass
class TunnelParts:
    """Everything tunnels need, built once."""

    local_bus: MemoryBus
    bus: MemoryBus | RedisBus
    tunnels: TunnelService
    shares: ShareService
    agents: AgentSessions
    events: EventLog
    prober: EndpointProber

    def loops(self, settings: Settings) -> list[asyncio.Task[None]]:
        """The background loops, started."""
        sweep_every = max(1.0, settings.agent_heartbeat_timeout / 6)
        tasks = [
            asyncio.create_task(sweep_loop(self.agents, sweep_every), name="agent-sweep"),
            asyncio.create_task(
                self.prober.run(min(1.0, settings.probe_interval / 4)), name="prober"
            ),
        ]
        if isinstance(self.bus, RedisBus):
            tasks.append(asyncio.create_task(self.bus.run(), name="event-bus"))
        return tasks

    async def bus_ready(self, within: float) -> None:
        """Wait (a little) for the Redis subscription, so that a replica that says it is
        serving also hears the other replicas' events; without Redis there is nothing to
        wait for, and a Redis that is down does not hold the start up."""
        if isinstance(self.bus, RedisBus):
            try:
                async with asyncio.timeout(within):
                    await self.bus.wait_connected()
            except TimeoutError:
                log.warning("event bus not subscribed yet; watchers hear this replica only")

    def end_streams(self) -> None:
        """End every watch stream of this process (the server is stopping)."""
        self.local_bus.end_all()

    async def close(self) -> None:
        """Release the bus's connections."""
        if isinstance(self.bus, RedisBus):
            await self.bus.close()


def build_bus(settings: Settings, redis: Redis | None) -> tuple[MemoryBus, MemoryBus | RedisBus]:
    """This process's bus, and the bus to publish on (Redis when there is one)."""
    local = MemoryBus()
    if redis is None:
        return local, local
    return local, RedisBus(redis, settings.redis_prefix, local)


def build_tunnels(
    settings: Settings,
    db: UnitOfWorkFactory,
    buses: tuple[MemoryBus, MemoryBus | RedisBus],
    lister: Lister,
    tiers: TierCatalog,
    clock: Clock,
) -> TunnelParts:
    """Tunnels, shares, agents and events over ``db``, publishing on ``buses``."""
    local, bus = buses
    tunnels = TunnelService(
        db,
        bus,
        lister,
        tiers,
        clock,
        TunnelSettings(
            listen_host=settings.tunnel_listen_host,
            port_min=settings.tunnel_port_min,
            port_max=settings.tunnel_port_max,
        ),
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
    return TunnelParts(
        local, bus, tunnels, ShareService(db, lister, clock), agents, EventLog(db, lister), prober
    )


@dataclass
class WebhookParts:
    """Webhook endpoints, their dispatcher, and the long-running operations runner."""

    webhooks: WebhookService
    operations: OperationService
    dispatcher: WebhookDispatcher
    runner: OperationRunner
    sender: WebhookSender
    dispatch: bool
    run_operations: bool
    db: UnitOfWorkFactory

    def loops(self) -> list[asyncio.Task[None]]:
        """The dispatcher and the operation runner, started (each unless this process is
        told not to run it), and the one-off sealing of headers stored in the clear."""
        tasks = [asyncio.create_task(seal_plain_headers(self.db), name="webhook-headers")]
        if self.run_operations:
            tasks.append(asyncio.create_task(self.runner.run(1.0), name="operations"))
        if self.dispatch:
            tasks.append(asyncio.create_task(self.dispatcher.run(), name="webhooks"))
        return tasks

    async def close(self) -> None:
        """Close the sender's connections."""
        await self.sender.close()


def build_webhooks(
    settings: Settings,
    db: UnitOfWorkFactory,
    buses: tuple[MemoryBus, MemoryBus | RedisBus],
    lister: Lister,
    clock: Clock,
    registry: CollectorRegistry,
) -> WebhookParts:
    """Webhooks over ``db``; the dispatcher wakes on every event this process hears."""
    local, bus = buses
    webhooks = WebhookService(
        db,
        bus,
        lister,
        clock,
        WebhookPolicy(
            require_https=settings.mode == "production",
            max_webhooks=settings.webhook_max_per_user,
            public_only=settings.webhook_public_only,
        ),
    )
    public = settings.webhook_public_only
    sender = WebhookSender(
        timeout=settings.webhook_timeout,
        # Endpoints are URLs users type: in production only global addresses are dialled,
        # checked after DNS on every new connection (SSRF, DNS rebinding).
        allow=public_only if public else None,
        max_connections=settings.webhook_concurrency,
    )
    dispatcher = WebhookDispatcher(
        db,
        sender,
        bus,
        clock,
        DispatchSettings(
            batch=settings.webhook_batch,
            concurrency=settings.webhook_concurrency,
            endpoint_concurrency=settings.webhook_endpoint_concurrency,
            lease=settings.webhook_claim_lease,
            schedule=tuple(timedelta(seconds=s) for s in settings.webhook_schedule),
            disable_after=timedelta(seconds=settings.webhook_disable_after),
        ),
        DispatchMetrics(registry),
    )
    runner = OperationRunner(db, clock, {REPLAY: webhooks.replay_step})
    webhooks.sender = dispatcher
    webhooks.operation_started = runner.wake
    local.listen(dispatcher.wake)
    return WebhookParts(
        webhooks,
        OperationService(db, lister),
        dispatcher,
        runner,
        sender,
        settings.webhook_dispatch,
        settings.run_operations,
        db,
    )
