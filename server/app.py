"""The composition root: builds every part from settings, starts it, and drains it.

Nothing else constructs collaborators; everything is passed in through constructors.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased
from prometheus_client import CollectorRegistry, start_http_server
from tunnelplane.v1 import (
    admin_pb2,
    agents_pb2,
    auth_pb2,
    events_pb2,
    operations_pb2,
    tunnels_pb2,
    users_pb2,
    webhooks_pb2,
)

from gateway.app import Gateway
from gateway.serve import HttpServer
from server import grpc_server, keys
from server.api.admin import AdminApi
from server.api.agent_stream import AgentMetrics
from server.api.agents import AgentApi
from server.api.auth import AuthApi
from server.api.events import EventApi
from server.api.operations import OperationApi
from server.api.tunnels import TunnelApi
from server.api.users import UserApi
from server.api.webhooks import WebhookApi
from server.domain.common.clock import Clock, SystemClock
from server.domain.common.listing import Lister, PageTokenCodec
from server.domain.identity.accounts import AccountService, SessionPolicy
from server.domain.identity.api_keys import ApiKeyService
from server.domain.identity.authentication import Authenticator, Revocations, SubjectDirectory
from server.domain.identity.model import Role, Tier
from server.domain.identity.passwords import PasswordHasher
from server.domain.identity.throttle import LoginThrottle, ThrottlePolicy
from server.domain.identity.tiers import TierCatalog
from server.domain.identity.users import UserPolicy, UserService
from server.domain.limits.model import BlockPolicy, Bucket
from server.domain.limits.service import QuotaService, RequestUsage, ViolationLog
from server.health import HealthMonitor, Listener
from server.http import build_gateway, http_guard
from server.interceptors.audit import AuditStage
from server.interceptors.auth import AuthenticateStage, AuthorizeStage, CallCredentials
from server.interceptors.context import RequestContextStage
from server.interceptors.deadline import DeadlineStage
from server.interceptors.errors import ErrorStage
from server.interceptors.logging import AccessLogStage
from server.interceptors.metrics import GrpcMetrics, MetricsStage
from server.interceptors.ratelimit import LimiterMetrics, RateLimitStage, RatePolicy
from server.interceptors.streams import StreamLimitStage, StreamRecheckStage
from server.interceptors.tracing import TracingStage
from server.load import LoadMonitor
from server.logs import AccessLog
from server.pipeline import Handler, MethodInfo, Pipeline
from server.policy import load_policies
from server.settings import Settings, networks
from server.storage.database import Database
from server.storage.kv import MemoryStore, RedisStore, ResilientStore, redis_client
from server.storage.limiter import REDIS_TIMEOUT, FallbackLimiter, MemoryLimiter, RedisLimiter
from server.storage.resp import Address, RespConnection
from server.storage.sealing import Sealer
from server.wiring import build_bus, build_tunnels, build_webhooks
from server.workers.purge import purge_loop
from server.workers.usage import RollupMetrics, UsageRollup

log = logging.getLogger("tunnelplane.server")

#: Every service this server implements, from the contract.
SERVICES: Sequence[ServiceDescriptor] = (
    auth_pb2.DESCRIPTOR.services_by_name["AuthService"],
    users_pb2.DESCRIPTOR.services_by_name["UserService"],
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"],
    tunnels_pb2.DESCRIPTOR.services_by_name["TunnelService"],
    agents_pb2.DESCRIPTOR.services_by_name["AgentService"],
    events_pb2.DESCRIPTOR.services_by_name["EventService"],
    webhooks_pb2.DESCRIPTOR.services_by_name["WebhookService"],
    operations_pb2.DESCRIPTOR.services_by_name["OperationService"],
)


def grpc_type(method: MethodDescriptor) -> str:
    """``unary``, ``client_stream``, ``server_stream`` or ``bidi_stream``."""
    return {
        (False, False): "unary",
        (True, False): "client_stream",
        (False, True): "server_stream",
        (True, True): "bidi_stream",
    }[(method.client_streaming, method.server_streaming)]


def method_table(services: Sequence[ServiceDescriptor]) -> list[MethodInfo]:
    """Every method of ``services`` with its policy; fails if any policy is missing."""
    descriptors = [m for service in services for m in service.methods]
    policies = load_policies(descriptors)
    return [
        MethodInfo(
            full_name=f"/{m.containing_service.full_name}/{m.name}",
            service=m.containing_service.full_name,
            name=m.name,
            grpc_type=grpc_type(m),
            request_type=message_factory.GetMessageClass(m.input_type),
            response_type=message_factory.GetMessageClass(m.output_type),
            policy=policies[m.full_name],
            descriptor=m,
        )
        for m in descriptors
    ]


def make_tracer_provider(settings: Settings) -> TracerProvider:
    """Spans are always made (their trace ids reach the logs); exported only by setting."""
    resource = Resource.create({"service.name": "tunnelplane"})
    if settings.otel_exporter == "none":
        return TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_OFF))
    provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(1.0)))
    if settings.otel_exporter == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=settings.otel_endpoint, insecure=True)
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


class App:
    """The whole server: build with settings, then :meth:`start` and :meth:`stop`."""

    def __init__(self, settings: Settings, *, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        material = keys.load(settings)
        self.db = Database(
            settings.effective_database_url,
            replica_url=settings.database_replica_url,
            pool_size=settings.database_pool_size,
            statement_timeout=settings.database_statement_timeout,
            clock=self.clock,
            sealer=Sealer(material.secrets_keys),
        )
        self.redis = redis_client(settings.redis_url) if settings.redis_url else None
        self.kv: ResilientStore | MemoryStore = (
            ResilientStore(RedisStore(self.redis, settings.redis_prefix), MemoryStore())
            if self.redis is not None
            else MemoryStore()
        )
        self.registry = CollectorRegistry()
        self.limiter_metrics = LimiterMetrics(self.registry)
        self.limiter = FallbackLimiter(
            RedisLimiter(
                self.redis,
                settings.redis_prefix,
                RespConnection(Address.parse(settings.redis_url), REDIS_TIMEOUT),
            )
            if self.redis is not None
            else None,
            MemoryLimiter(),
            on_switch=lambda backend: self.limiter_metrics.use_backend(backend, switched=True),
            on_error=self.limiter_metrics.errors.inc,
        )
        self.limiter_metrics.use_backend(self.limiter.backend, switched=False)
        self.load = LoadMonitor(
            lag_threshold=settings.load_lag_threshold,
            inflight_threshold=settings.load_inflight_threshold,
            enabled=settings.adaptive_limits,
        )
        self._build_domain(settings, material)
        self.tracer_provider = make_tracer_provider(settings)
        self.methods = method_table(SERVICES)
        self.chains = self._build_chains()
        self.server: grpc.aio.Server | None = None
        self.health: HealthMonitor | None = None
        self.grpc_port = 0
        self.http_port = 0
        self.metrics_port = 0
        self.gateway: Gateway | None = None
        self.http: HttpServer | None = None
        self._metrics_server: Any = None
        self._tasks: list[asyncio.Task[None]] = []

    def _build_domain(self, settings: Settings, material: keys.KeyMaterial) -> None:
        db, kv, clock = self.db, self.kv, self.clock
        lister = Lister(
            PageTokenCodec(material.page_token_secret),
            settings.default_page_size,
            settings.max_page_size,
        )
        from server.domain.identity.tokens import TokenService

        self.tokens = TokenService(
            material.jwt_keys,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            ttl=settings.access_token_ttl,
            clock=clock,
        )
        self.hasher = hasher = PasswordHasher(
            settings.argon2_time_cost,
            settings.argon2_memory_kib,
            settings.argon2_parallelism,
            max_concurrent=settings.password_hash_concurrency or os.cpu_count() or 1,
        )
        throttle = LoginThrottle(
            kv,
            ThrottlePolicy(
                window=settings.login_window,
                slowdown_after=settings.login_slowdown_after,
                lock_after=settings.login_lock_after,
                ip_lock_after=settings.login_ip_lock_after,
                lock_duration=settings.login_lock_duration,
            ),
            clock,
        )
        revocations = Revocations(kv, clock, settings.access_token_ttl)
        self.buses = build_bus(settings, self.redis)
        subjects = SubjectDirectory(db, kv)
        self.api_keys = ApiKeyService(
            db,
            kv,
            lister,
            clock,
            default_overlap=timedelta(seconds=settings.api_key_rotation_overlap),
        )
        self.authenticator = Authenticator(
            self.tokens,
            subjects,
            revocations,
            self.api_keys,
            kv,
            db,
            clock,
            # A stream's session is read at most once per re-check interval.
            session_cache_ttl=settings.stream_recheck_interval,
        )
        self.credentials = CallCredentials(self.authenticator)
        self.accounts = AccountService(
            db,
            hasher,
            self.tokens,
            throttle,
            revocations,
            clock,
            SessionPolicy(
                absolute_ttl=timedelta(seconds=settings.refresh_token_ttl),
                idle_ttl=timedelta(seconds=settings.refresh_token_idle_ttl),
            ),
            self.buses[1],
        )
        self.users = UserService(
            db,
            subjects,
            revocations,
            lister,
            clock,
            UserPolicy(
                soft_delete_retention=timedelta(seconds=settings.soft_delete_retention),
                avatar_max_bytes=settings.avatar_max_bytes,
            ),
            self.buses[1],
        )
        self.tiers = TierCatalog(settings.tiers)
        self.lister = lister
        self.quotas = QuotaService(self.limiter, self.tiers, clock, db)
        self.usage = RequestUsage(db, self.limiter, clock, logging.getLogger("tunnelplane.usage"))
        self.usage_rollup = UsageRollup(
            self.usage,
            settings.usage_flush_interval,
            RollupMetrics(self.registry),
            logging.getLogger("tunnelplane.usage"),
        )
        self.violations = ViolationLog(
            db, lister, clock, logging.getLogger("tunnelplane.ratelimit")
        )
        self.tunnel_parts = build_tunnels(settings, db, self.buses, lister, self.tiers, clock)
        self.webhook_parts = build_webhooks(settings, db, self.buses, lister, clock, self.registry)
        self.stopping = False

    def _rate_limit_stage(self) -> RateLimitStage | None:
        settings = self.settings
        if not settings.rate_limit_enabled:
            return None
        policy = RatePolicy(
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
        for tier in Tier:
            self.limiter_metrics.factor.labels(tier.value).set_function(
                functools.partial(self.load.factor, tier)
            )
        self.limiter_metrics.load.set_function(lambda: self.load.level)
        return RateLimitStage(
            self.limiter,
            policy,
            self.load,
            self.violations,
            self.limiter_metrics,
            self.clock,
            logging.getLogger("tunnelplane.ratelimit"),
            self.usage,
        )

    async def _fresh_redis_connections(self, up: bool, _probed_at: float) -> None:
        """When Redis is back, drop the pool's connections to the Redis that went away
        before the fallbacks switch back to it (each would fail once)."""
        degraded = isinstance(self.kv, ResilientStore) and self.kv.degraded
        if up and self.redis is not None and (degraded or self.limiter.backend == "memory"):
            await self.redis.connection_pool.disconnect()

    def _build_chains(self) -> dict[str, Handler]:
        self.rate_limit_stage = self._rate_limit_stage()
        self.stream_limits = StreamLimitStage(self.tiers, self.registry)
        self.agent_api = AgentApi(
            self.tunnel_parts.agents,
            self.tunnel_parts.tunnels,
            lambda: self.stopping,
            self.credentials.recheck,
            AgentMetrics(self.registry),
        )
        servicers: dict[str, object] = {
            "tunnelplane.v1.AuthService": AuthApi(
                self.accounts, self.api_keys, self.tokens, self.clock
            ),
            "tunnelplane.v1.UserService": UserApi(self.users, self.tiers, self.quotas, self.clock),
            "tunnelplane.v1.TunnelService": TunnelApi(
                self.tunnel_parts.tunnels,
                self.tunnel_parts.shares,
                self.tunnel_parts.agents,
                self.users,
                self.clock,
                self.credentials.recheck,
                self.tunnel_parts.events,
            ),
            "tunnelplane.v1.AgentService": self.agent_api,
            "tunnelplane.v1.EventService": EventApi(self.tunnel_parts.events),
            "tunnelplane.v1.WebhookService": WebhookApi(self.webhook_parts.webhooks),
            "tunnelplane.v1.OperationService": OperationApi(
                self.webhook_parts.operations, self.clock
            ),
            "tunnelplane.v1.AdminService": AdminApi(
                lambda: self.health,
                self.limiter,
                self.load,
                self.rate_limit_stage,
                self.violations,
                self.lister,
            ),
        }
        pipeline = Pipeline(
            [
                RequestContextStage(networks(self.settings.trusted_proxies)),
                AccessLogStage(
                    AccessLog(
                        logging.getLogger("tunnelplane.access"),
                        json_lines=self.settings.log_format == "json",
                    )
                ),
                MetricsStage(GrpcMetrics(self.registry)),
                TracingStage(
                    self.tracer_provider.get_tracer("tunnelplane.server"),
                    enabled=self.settings.otel_exporter != "none",
                ),
                DeadlineStage(self.settings.default_deadline),
                AuditStage(self.db, self.clock, log),
                AuthenticateStage(self.credentials),
                *([self.rate_limit_stage] if self.rate_limit_stage is not None else []),
                AuthorizeStage(
                    tls_required=self.settings.mode == "production",
                    shares=self.tunnel_parts.shares,
                ),
                self.stream_limits,
                StreamRecheckStage(
                    self.credentials.recheck,
                    self.settings.stream_recheck_interval,
                    logging.getLogger("tunnelplane.streams"),
                    self.registry,
                ),
                ErrorStage(log),
            ]
        )
        return {m.full_name: pipeline.build(m, _endpoint(servicers, m)) for m in self.methods}

    async def start(self) -> None:
        """Bind, probe dependencies once, start serving and the background loops."""
        settings = self.settings
        server = grpc.aio.server(options=grpc_server.SERVER_OPTIONS)
        security = grpc_server.Security(
            bool(settings.tls_cert_file), networks(settings.grpc_tls_proxies)
        )
        server.add_generic_rpc_handlers(
            grpc_server.service_handlers(self.methods, self.chains, security=security)
        )
        health_servicer = grpc_server.add_health(server)
        names = [s.full_name for s in SERVICES]
        grpc_server.add_reflection(server, [*names, health.SERVICE_NAME])
        self.grpc_port = grpc_server.bind(
            server,
            f"{settings.grpc_host}:{settings.grpc_port}",
            settings.tls_cert_file,
            settings.tls_key_file,
        )
        checks = {"database": self.db.ping}
        listeners: dict[str, list[Listener]] = {}
        if isinstance(self.kv, ResilientStore):
            # Redis is optional: without it, shared state and limits fall back in-process.
            checks["redis"] = self.kv.ping
            listeners["redis"] = [
                self._fresh_redis_connections,
                self.kv.set_available,
                self.limiter.set_available,
            ]
        needs = {name: frozenset(checks) for name in names}
        self.health = HealthMonitor(
            health_servicer,
            checks,
            needs,
            interval=settings.health_interval,
            optional=frozenset({"redis"}),
            listeners=listeners,
        )
        await self.health.check_once()
        await server.start()
        self.server = server
        self._start_metrics()
        await self._start_http()
        self._tasks = [
            asyncio.create_task(self.health.run(), name="health"),
            asyncio.create_task(purge_loop(self.users, log), name="purge"),
            asyncio.create_task(self.load.run(), name="load"),
            asyncio.create_task(
                self.violations.run(settings.violation_flush_interval), name="violations"
            ),
            asyncio.create_task(self.usage_rollup.run(), name="usage-rollup"),
            *self.tunnel_parts.loops(settings),
            *self.webhook_parts.loops(),
        ]
        await self.tunnel_parts.bus_ready(within=2.0)
        log.info(
            "serving",
            extra={
                "grpc_port": self.grpc_port,
                "http_port": self.http_port,
                "metrics_port": self.metrics_port,
                "mode": settings.mode,
                "tls": bool(settings.tls_cert_file),
            },
        )

    async def _start_http(self) -> None:
        settings = self.settings
        if settings.http_port < 0:
            return
        health = self.health
        assert health is not None
        self.gateway = build_gateway(
            settings, self.methods, self.chains, health.serving, self.registry
        )
        self.http = HttpServer(
            self.gateway,
            settings.http_host,
            settings.http_port,
            certfile=settings.tls_cert_file,
            keyfile=settings.tls_key_file,
            graceful_seconds=settings.shutdown_grace,
            guard=http_guard(settings),
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
        """Report NOT_SERVING, refuse new calls, let in-flight calls finish, then close."""
        grace = self.settings.shutdown_grace if grace is None else grace
        self.stopping = True
        if self.health is not None:
            await self.health.shutdown()
        self.tunnel_parts.end_streams()  # watchers re-watch: elsewhere
        stopping = []
        if self.server is not None:
            stopping.append(self.server.stop(grace))
        # Agents are told to reconnect (elsewhere) now, so their streams, which would last
        # until the grace runs out, end at once; their open connections do not depend on
        # this server. One that reconnects here before the listener closes is told again.
        self.agent_api.go_away()
        if self.http is not None:
            stopping.append(self.http.stop())
        await asyncio.gather(*stopping)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        await self.close()

    async def close(self) -> None:
        """Release connections (also for an App that was built but never started)."""
        self.hasher.close()
        with contextlib.suppress(Exception):
            await self.violations.flush()  # the last few seconds of refusals
        with contextlib.suppress(Exception):
            await self.usage.settled()
            await self.usage_rollup.flush()  # the requests counted since the last roll-up
        await self.db.dispose()
        await self.kv.close()
        await self.limiter.close()
        await self.tunnel_parts.close()
        await self.webhook_parts.close()
        self.tracer_provider.shutdown()


def _endpoint(servicers: dict[str, object], method: MethodInfo) -> Handler:
    servicer = servicers.get(method.service)
    handler: Callable[..., Any] | None = getattr(servicer, method.name, None)
    if handler is None:
        raise RuntimeError(f"{method.full_name} has no implementation; refusing to start")
    return handler
