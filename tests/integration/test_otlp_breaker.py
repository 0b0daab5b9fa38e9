"""The span exporter behind the ``otlp`` breaker, with the real OTLP/gRPC exporter: spans
to a live collector are exported; to one that does not answer they fail, and once the
breaker opens they are dropped at once, each counted."""

from __future__ import annotations

import time
from pathlib import Path

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExportResult
from prometheus_client import CollectorRegistry

from server.resilience.breakers import BreakerKind, Breakers
from server.resilience.otlp import GuardedSpanExporter
from tests.helpers import free_port
from tests.integration.test_otlp_traces import Collector, collector  # noqa: F401 - fixture


def spans(count: int) -> list[ReadableSpan]:
    tracer = TracerProvider().get_tracer("test")
    made = []
    for i in range(count):
        with tracer.start_as_current_span(f"span-{i}") as span:
            made.append(span)
    return made  # type: ignore[return-value]


def counted(registry: CollectorRegistry, result: str) -> float:
    return registry.get_sample_value("tunnelplane_spans_total", {"result": result}) or 0.0


def guarded(endpoint: str) -> tuple[GuardedSpanExporter, Breakers, CollectorRegistry]:
    registry = CollectorRegistry()
    breakers = Breakers({"otlp": BreakerKind(2, 60.0)}, registry)
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True, timeout=1)
    return GuardedSpanExporter(exporter, breakers, registry), breakers, registry


def test_a_live_collector_gets_the_spans(collector: tuple[Collector, int]) -> None:  # noqa: F811
    found, port = collector
    exporter, _, registry = guarded(f"127.0.0.1:{port}")
    assert exporter.export(spans(3)) is SpanExportResult.SUCCESS
    assert len(found.spans) == 3
    assert counted(registry, "exported") == 3


def test_a_dead_collector_opens_the_breaker_and_spans_are_dropped_at_once(
    tmp_path: Path,
) -> None:
    exporter, breakers, registry = guarded(f"127.0.0.1:{free_port()}")
    for _ in range(2):
        assert exporter.export(spans(2)) is SpanExportResult.FAILURE
    assert counted(registry, "failed") == 4
    (state,) = breakers.states()
    assert (state.name, state.state) == ("otlp", "opened")
    started = time.monotonic()
    assert exporter.export(spans(5)) is SpanExportResult.FAILURE
    assert time.monotonic() - started < 0.5  # not tried at all
    assert counted(registry, "dropped") == 5
    exporter.shutdown()
