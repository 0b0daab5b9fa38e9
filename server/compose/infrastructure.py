"""Infrastructure: the database, Redis and the state shared through it, the metrics
registry, tracing, and the listing rules every resource shares."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from server import errortracking, keys
from server.backup import BackupAge
from server.domain.common.clock import Clock
from server.domain.common.listing import Lister, PageTokenCodec
from server.errortracking import ErrorReporter
from server.resilience.breakers import BreakerKind, Breakers
from server.resilience.otlp import GuardedSpanExporter
from server.settings import Settings
from server.storage.database import Database
from server.storage.dbmetrics import DatabaseMetrics
from server.storage.kv import MemoryStore, RedisStore, ResilientStore, redis_client
from server.storage.replica import ReplicaMetrics
from server.storage.sealing import Sealer
from server.storage.tracing import trace_engine, trace_redis
from server.workers.supervisor import Loop


@dataclass
class Infrastructure:
    """What every area builds on."""

    settings: Settings
    clock: Clock
    keys: keys.KeyMaterial
    db: Database
    #: None without TP_REDIS_URL: shared state, limits and the bus stay in-process.
    redis: Redis | None
    kv: ResilientStore | MemoryStore
    registry: CollectorRegistry
    lister: Lister
    tracer_provider: TracerProvider
    #: Unexpected errors (Sentry when TP_SENTRY_DSN is set).
    errors: ErrorReporter
    #: The circuit breakers on outbound dependencies.
    breakers: Breakers

    def loops(self) -> Sequence[Loop]:
        """None."""
        return ()

    async def aclose(self) -> None:
        """Close the database's and Redis's connections; flush the spans and errors."""
        await self.db.dispose()
        await self.kv.close()
        self.tracer_provider.shutdown()
        self.errors.close()


def build(settings: Settings, clock: Clock) -> Infrastructure:
    """Connections are opened lazily, on first use."""
    material = keys.load(settings)
    registry = CollectorRegistry()
    registry.register(BackupAge(settings.backup_directory))
    breakers = Breakers(
        {
            "webhook": BreakerKind(settings.breaker_threshold, settings.breaker_open_time),
            "proxy-admin": BreakerKind(settings.breaker_threshold, settings.breaker_open_time),
            "otlp": BreakerKind(settings.breaker_threshold, settings.breaker_open_time),
        },
        registry,
    )
    db = Database(
        settings.effective_database_url,
        replica_url=settings.database_replica_url,
        replica_max_lag=settings.replica_max_lag,
        probe_interval=settings.health_interval,
        pool_size=settings.database_pool_size,
        statement_timeout=settings.database_statement_timeout,
        clock=clock,
        sealer=Sealer(material.secrets_keys),
        metrics=DatabaseMetrics(registry, settings.slow_query_ms),
        replica_metrics=ReplicaMetrics(registry) if settings.database_replica_url else None,
    )
    redis = redis_client(settings.redis_url) if settings.redis_url else None
    provider = tracer_provider(settings, breakers, registry)
    if settings.otel_exporter != "none":
        for engine in {id(e): e for e in (db.engine, db.replica)}.values():
            trace_engine(engine, provider)
        if redis is not None:
            trace_redis(redis, provider)
    kv: ResilientStore | MemoryStore = MemoryStore()
    if redis is not None:
        kv = ResilientStore(RedisStore(redis, settings.redis_prefix), MemoryStore())
    lister = Lister(
        PageTokenCodec(material.page_token_secret),
        settings.default_page_size,
        settings.max_page_size,
    )
    return Infrastructure(
        settings,
        clock,
        material,
        db,
        redis,
        kv,
        registry,
        lister,
        provider,
        errortracking.start(
            settings.sentry_dsn,
            settings.sentry_environment or settings.mode,
            settings.sentry_traces_sample_rate,
        ),
        breakers,
    )


def tracer_provider(
    settings: Settings, breakers: Breakers, registry: CollectorRegistry
) -> TracerProvider:
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
        guarded = GuardedSpanExporter(exporter, breakers, registry)
        provider.add_span_processor(BatchSpanProcessor(guarded))
    return provider
