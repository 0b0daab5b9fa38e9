"""Prometheus metrics with the standard gRPC server names."""

from __future__ import annotations

import time

from google.protobuf.message import Message
from prometheus_client import CollectorRegistry, Counter, Histogram

from server.domain.common.errors import Code
from server.pipeline import Call, Handler, MethodInfo, outcome_of

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class GrpcMetrics:
    """The gRPC server metric families, registered in one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter(
            "grpc_server_started_total", "RPCs started on the server.", labels, registry=registry
        )
        self.handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, regardless of success or failure.",
            [*labels, "grpc_code"],
            registry=registry,
        )
        self.seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time to handle an RPC until the server finished with it.",
            [*labels, "grpc_code"],
            buckets=BUCKETS,
            registry=registry,
        )


class MetricsStage:
    """Counts and times every call; label children are bound once per method and code."""

    def __init__(self, metrics: GrpcMetrics) -> None:
        self._metrics = metrics

    def wrap(self, method: MethodInfo, handler: Handler) -> Handler:
        labels = (method.grpc_type, method.service, method.name)
        started = self._metrics.started.labels(*labels)
        by_code: dict[Code, tuple[Counter, Histogram]] = {}
        metrics = self._metrics

        def children(code: Code) -> tuple[Counter, Histogram]:
            pair = by_code.get(code)
            if pair is None:
                pair = (
                    metrics.handled.labels(*labels, code.name),
                    metrics.seconds.labels(*labels, code.name),
                )
                by_code[code] = pair
            return pair

        async def handle(request: Message, call: Call) -> Message:
            started.inc()
            start = time.perf_counter()
            code = Code.OK
            try:
                return await handler(request, call)
            except BaseException as exc:
                code = outcome_of(exc)
                raise
            finally:
                handled, seconds = children(code)
                handled.inc()
                seconds.observe(time.perf_counter() - start)

        return handle
