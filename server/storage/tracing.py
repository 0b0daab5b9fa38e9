"""Client spans of the server's own dependencies, under each call's span, when spans are
exported (``TP_OTEL_EXPORTER`` not ``none``): every SQL statement of each engine
(OpenTelemetry's SQLAlchemy instrumentation: the statement with its placeholders, never
its parameters), every Redis command (OpenTelemetry's Redis instrumentation: the
command name with ``?`` for each argument) and every webhook attempt (OpenTelemetry's
aiohttp client instrumentation, on the sender's own session; the URL without its query
string or credentials, which users put secrets in).

Both attach to the objects this process made (an engine's event listeners, one client's
methods), not to the libraries: two servers in one process (the tests) trace what each
one owns. The SQLAlchemy instrumentation's engine tracer is its per-engine part; its
connection-usage metric goes to a no-op meter (the pool metrics are
:mod:`server.storage.dbmetrics`).
"""

from __future__ import annotations

import aiohttp
import yarl
from opentelemetry.instrumentation.aiohttp_client import create_trace_config
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.trace import TracerProvider
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

_NO_METER = NoOpMeterProvider().get_meter("tunnelplane.db")


def trace_engine(engine: AsyncEngine, provider: TracerProvider) -> EngineTracer:
    """A span for every statement ``engine`` runs."""
    tracer = provider.get_tracer("opentelemetry.instrumentation.sqlalchemy")
    usage = _NO_METER.create_up_down_counter("db.client.connections.usage")
    return EngineTracer(tracer, engine.sync_engine, usage, enable_commenter=False)  # type: ignore[no-untyped-call]


def trace_redis(client: Redis, provider: TracerProvider) -> None:
    """A span for every command ``client`` sends."""
    RedisInstrumentor.instrument_client(client, tracer_provider=provider)


def http_trace_config(provider: TracerProvider) -> aiohttp.TraceConfig:
    """Client spans of an aiohttp session's requests, their URLs without query or
    credentials."""
    return create_trace_config(url_filter=_bare_url, tracer_provider=provider)


def _bare_url(url: yarl.URL) -> str:
    return str(url.with_query(None).with_fragment(None).with_user(None))
