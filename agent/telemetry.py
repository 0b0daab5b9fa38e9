"""OpenTelemetry on the agent's control link (``--otel-exporter``).

With an exporter, each call on the control-plane channel (the Connect stream) is a CLIENT
span made by the grpc.aio interceptors of ``opentelemetry-instrumentation-grpc``, and its
``traceparent`` goes to the control plane, which continues the trace and logs its trace
id: one trace id ties the agent's spans to the control plane's log lines. Without one no
span is made and nothing is sent; the control plane starts the trace itself, as it does
for any caller that sends none (an unsampled span made here would send ``sampled=0`` and
stop a control plane that samples by its parent from tracing agents at all).
"""

from __future__ import annotations

from typing import Literal

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

Exporter = Literal["none", "console", "otlp"]
EXPORTERS: tuple[Exporter, ...] = ("none", "console", "otlp")
SERVICE_NAME = "tunnelplane-agent"


def tracer_provider(exporter: Exporter, endpoint: str) -> TracerProvider | None:
    """Spans sent to ``exporter`` (console: stdout; otlp: the collector at ``endpoint``,
    ``host:port``); None for ``none``."""
    if exporter == "none":
        return None
    if exporter == "console":
        return exporting_to(SimpleSpanProcessor(ConsoleSpanExporter()))
    # Imported only when used: the OTLP exporter brings a second gRPC stack of its own.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return exporting_to(BatchSpanProcessor(OTLPSpanExporter(endpoint, insecure=True)))


def exporting_to(processor: SpanProcessor) -> TracerProvider:
    """A provider whose spans, sampled as their parent says (a root: always), go to
    ``processor``."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": SERVICE_NAME}), sampler=ParentBased(ALWAYS_ON)
    )
    provider.add_span_processor(processor)
    return provider


def client_interceptors(provider: TracerProvider | None) -> list[grpc.aio.ClientInterceptor]:
    """The interceptors that trace the control-plane channel's calls; none without spans."""
    if provider is None:
        return []
    interceptors: list[grpc.aio.ClientInterceptor] = aio_client_interceptors(  # type: ignore[no-untyped-call] # the package has no annotations
        tracer_provider=provider
    )
    return interceptors
