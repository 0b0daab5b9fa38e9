"""OpenTelemetry on the standalone gateway's upstream channel: one CLIENT span per call
(the grpc.aio interceptors of ``opentelemetry-instrumentation-grpc``), child of the HTTP
caller's W3C trace context, whose own ``traceparent`` goes upstream in the metadata.

Only with an exporter. Without one nobody would ever see a client span, so no interceptor
is installed and the caller's ``traceparent``/``tracestate`` go upstream unchanged (the
header mapping forwards them): the upstream's trace id is still the caller's. Making a
root span for a request that brought none would also be wrong there: an unsampled root
sends ``sampled=0`` upstream, and an upstream that samples by its parent would then stop
tracing every call that comes through the gateway.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import grpc
from opentelemetry import context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

Exporter = Literal["none", "console", "otlp"]
EXPORTERS: tuple[Exporter, ...] = ("none", "console", "otlp")
#: The W3C trace context headers, as metadata keys.
TRACE_KEYS = frozenset({"traceparent", "tracestate"})
Pairs = list[tuple[str, str | bytes]]

_PROPAGATOR = TraceContextTextMapPropagator()


def tracer_provider(exporter: Exporter, endpoint: str, service: str) -> TracerProvider | None:
    """The provider of ``service``'s spans, sent to ``exporter`` (console: stdout; otlp: the
    collector's gRPC ``endpoint``, ``host:port``); None for ``none``."""
    if exporter == "none":
        return None
    if exporter == "console":
        return exporting_to(SimpleSpanProcessor(ConsoleSpanExporter()), service)
    # Imported only when used: the OTLP exporter brings a second gRPC stack of its own.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    otlp = OTLPSpanExporter(endpoint=endpoint, insecure=True)
    return exporting_to(BatchSpanProcessor(otlp), service)


def exporting_to(processor: SpanProcessor, service: str) -> TracerProvider:
    """A provider whose spans, sampled as their parent says (a root: always), go to
    ``processor``."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": service}), sampler=ParentBased(ALWAYS_ON)
    )
    provider.add_span_processor(processor)
    return provider


def client_interceptors(provider: TracerProvider | None) -> list[grpc.aio.ClientInterceptor]:
    """The interceptors of a channel whose calls ``provider`` traces (health checks
    aside: a probe every few seconds is not worth a span); none without a provider."""
    if provider is None:
        return []
    # Imported only when used (some 30 ms): the embedded gateway never needs it.
    from opentelemetry.instrumentation.grpc import aio_client_interceptors
    from opentelemetry.instrumentation.grpc.filters import health_check, negate

    interceptors: list[grpc.aio.ClientInterceptor] = aio_client_interceptors(  # type: ignore[no-untyped-call] # the package has no annotations
        tracer_provider=provider, filter_=negate(health_check())
    )
    return interceptors


@contextlib.contextmanager
def continuing(metadata: Pairs) -> Iterator[Pairs]:
    """While the block starts a call, make the trace context ``metadata`` carries current,
    so the client span continues it; yield the metadata without it (the interceptor sends
    the client span's own)."""
    carrier: dict[str, Any] = {k: v for k, v in metadata if k in TRACE_KEYS}
    if not carrier:
        yield metadata
        return
    token = context.attach(_PROPAGATOR.extract(carrier))
    try:
        yield [(k, v) for k, v in metadata if k not in TRACE_KEYS]
    finally:
        context.detach(token)
