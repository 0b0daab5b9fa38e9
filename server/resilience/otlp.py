"""The span exporter behind a circuit breaker (``otlp``): while the OTLP collector does not
answer, batches are dropped at once, and counted, instead of each waiting out the
exporter's own retries and timeout in the batch processor's thread (the queue would fill
and drop spans anyway, uncounted)."""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from prometheus_client import CollectorRegistry, Counter

from server.resilience.breakers import BreakerOpenError, Breakers


class _ExportFailedError(Exception):
    pass


def _exported(result: SpanExportResult) -> None:
    if result is not SpanExportResult.SUCCESS:
        raise _ExportFailedError


class GuardedSpanExporter(SpanExporter):
    """Exports through ``exporter`` under the ``otlp`` breaker, counting spans by result:
    ``exported``, ``failed`` (the collector refused or did not answer) or ``dropped``
    (not tried: the breaker is open)."""

    def __init__(
        self, exporter: SpanExporter, breakers: Breakers, registry: CollectorRegistry
    ) -> None:
        self._exporter = exporter
        self._breakers = breakers
        self._spans = Counter(
            "tunnelplane_spans",
            "Spans handed to the OTLP exporter, by result: exported, failed, dropped "
            "(its circuit breaker was open).",
            ["result"],
            registry=registry,
        )

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            with self._breakers.guard_sync("otlp"):
                _exported(self._exporter.export(spans))
        except BreakerOpenError:
            self._spans.labels("dropped").inc(len(spans))
            return SpanExportResult.FAILURE
        except _ExportFailedError:
            self._spans.labels("failed").inc(len(spans))
            return SpanExportResult.FAILURE
        self._spans.labels("exported").inc(len(spans))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporter.force_flush(timeout_millis)
