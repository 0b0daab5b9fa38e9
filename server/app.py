"""The composition root: builds every part from settings, starts it, and drains it.

The infrastructure first, then one area after another in dependency order
(:mod:`server.compose`: each built the same way, with the same shape: its collaborators,
``loops()``, ``aclose()``), then the API over them. :meth:`App.start` binds the servers
and starts every area's background loops under one supervisor; :meth:`App.stop` takes
them down in the reverse order. Nothing else constructs collaborators; everything is
passed in through constructors.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from grpc_health.v1 import health as grpc_health
from prometheus_client import start_http_server

from gateway.app import Gateway
from gateway.serve import HttpServer
from server import grpc_server
from server.compose import (
    Area,
    api,
    events,
    health,
    identity,
    infrastructure,
    limits,
    notifications,
    operations,
    proxies,
    tunnels,
    webhooks,
)
from server.compose.api import SERVICES, method_table
from server.domain.common.clock import Clock, SystemClock
from server.domain.webhooks.model import REPLAY
from server.http import build_gateway, http_guard
from server.settings import Settings, networks
from server.workers.supervisor import Supervisor, WorkerMetrics

__all__ = ["SERVICES", "App", "method_table"]

log = logging.getLogger("tunnelplane.server")


class App:
    """The whole server: build with settings, then :meth:`start` and :meth:`stop`."""

    def __init__(self, settings: Settings, *, clock: Clock | None = None) -> None:
        self.settings = settings
        self.infra = infrastructure.build(settings, clock or SystemClock())
        self.clock, self.db, self.registry = self.infra.clock, self.infra.db, self.infra.registry
        self.tracer_provider = self.infra.tracer_provider
        self.events = events.build(self.infra)
        self.identity = identity.build(self.infra, self.events)
        self.limits = limits.build(self.infra, self.identity.tiers)
        self.tunnels = tunnels.build(self.infra, self.events, self.identity)
        # Made before both: a replay the webhooks start wakes the operations' runner.
        operation_started = asyncio.Event()
        self.webhooks = webhooks.build(self.infra, self.events, operation_started.set)
        self.operations = operations.build(
            self.infra, {REPLAY: self.webhooks.webhooks.replay_step}, operation_started
        )
        self.health = health.build(self.infra, self.limits, [s.full_name for s in SERVICES])
        self.proxies = proxies.build(
            self.infra, self.events, self.identity, self.tunnels, lambda: self.grpc_port
        )
        self._stopping = asyncio.Event()
        self.api = api.build(
            self.infra,
            api.Areas(
                self.identity,
                self.limits,
                self.events,
                self.tunnels,
                self.webhooks,
                self.operations,
                self.health,
                self.proxies,
            ),
            self._stopping.is_set,
        )
        self.methods, self.chains = self.api.methods, self.api.chains
        self.notifications = notifications.build(
            self.infra, self.events, self.health, self.api.outcomes
        )
        self.supervisor = Supervisor(WorkerMetrics(self.registry), errors=self.infra.errors)
        self.server: grpc.aio.Server | None = None
        self.gateway: Gateway | None = None
        self.http: HttpServer | None = None
        self._metrics_server: Any = None
        self.grpc_port = self.http_port = self.metrics_port = 0

    @property
    def areas(self) -> list[Area]:
        """Every area, in the order they were built (and their loops start)."""
        return [
            self.infra,
            self.events,
            self.identity,
            self.limits,
            self.tunnels,
            self.webhooks,
            self.operations,
            self.health,
            self.api,
            self.proxies,
            self.notifications,
        ]

    async def start(self) -> None:
        """Probe dependencies once, bind and start serving, then the background loops."""
        await self.health.monitor.check_once()
        await self._start_grpc()
        self._start_metrics()
        await self._start_http()
        self.supervisor.start(loop for area in self.areas for loop in area.loops())
        await self.events.ready(within=2.0)
        log.info(
            "serving",
            extra={
                "grpc_port": self.grpc_port,
                "http_port": self.http_port,
                "metrics_port": self.metrics_port,
                "mode": self.settings.mode,
                "tls": bool(self.settings.tls_cert_file),
            },
        )

    async def _start_grpc(self) -> None:
        settings = self.settings
        reuse_port = settings.workers > 1  # the processes of a group share the ports
        server = grpc.aio.server(options=grpc_server.server_options(reuse_port=reuse_port))
        security = grpc_server.Security(
            bool(settings.tls_cert_file), networks(settings.grpc_tls_proxies)
        )
        server.add_generic_rpc_handlers(
            grpc_server.service_handlers(self.methods, self.chains, security=security)
        )
        grpc_server.add_health(server, self.health.servicer)
        names = [s.full_name for s in SERVICES]
        grpc_server.add_reflection(server, [*names, grpc_health.SERVICE_NAME])
        self.grpc_port = grpc_server.bind(
            server,
            f"{settings.grpc_host}:{settings.grpc_port}",
            settings.tls_cert_file,
            settings.tls_key_file,
        )
        await server.start()
        self.server = server

    async def _start_http(self) -> None:
        settings = self.settings
        if settings.http_port < 0:
            return
        self.gateway = build_gateway(
            settings, self.methods, self.chains, self.health.monitor.serving, self.registry
        )
        self.http = HttpServer(
            self.gateway,
            settings.http_host,
            settings.http_port,
            certfile=settings.tls_cert_file,
            keyfile=settings.tls_key_file,
            graceful_seconds=settings.shutdown_grace,
            guard=http_guard(settings),
            reuse_port=settings.workers > 1,
        )
        await self.http.start()
        self.http_port = self.http.port

    def _start_metrics(self) -> None:
        if self.settings.metrics_port < 0:
            return
        server, _thread = start_http_server(
            self.settings.metrics_port, self.settings.metrics_host, registry=self.registry
        )
        self._metrics_server = server
        self.metrics_port = server.server_port

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, refuse new calls, let in-flight calls finish, stop and drain
        the background loops, then close."""
        grace = self.settings.shutdown_grace if grace is None else grace
        self._stopping.set()
        await self.health.monitor.shutdown()
        self.events.end_streams()  # watchers re-watch: elsewhere
        stopping = []
        if self.server is not None:
            stopping.append(self.server.stop(grace))
        # Agents are told to reconnect (elsewhere) now, so their streams, which would last
        # until the grace runs out, end at once; their open connections do not depend on
        # this server. One that reconnects here before the listener closes is told again.
        self.api.agents.go_away()
        if self.http is not None:
            stopping.append(self.http.stop())
        await asyncio.gather(*stopping)
        await self.supervisor.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        await self.close()

    async def close(self) -> None:
        """Release connections, last built first (also for an App never started)."""
        for area in reversed(self.areas):
            await area.aclose()
