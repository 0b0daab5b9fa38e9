"""Prometheus metrics with the standard gRPC server names."""

from __future__ import annotations

import time
from typing import Protocol

from google.protobuf.message import Message
from prometheus_client import CollectorRegistry, Counter, Histogram

from server.domain.common.errors import Code, DomainError
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


class Outcomes(Protocol):
    """Where each call's outcome is also counted (error analytics)."""

    def succeeded(self, method: str) -> None: ...
    def failed(self, method: str, code: str, reason: str) -> None: ...


class MetricsStage:
    """Counts and times every call; label children are bound once per method and code.
    With ``outcomes``, each call's outcome (a failure's reason too) is also counted there."""

    def __init__(self, metrics: GrpcMetrics, outcomes: Outcomes | None = None) -> None:
        self._metrics = metrics
        self._outcomes = outcomes

    def wrap(self, method: MethodInfo, handler: Handler) -> Handler:
        labels = (method.grpc_type, method.service, method.name)
        started = self._metrics.started.labels(*labels)
        by_code: dict[Code, tuple[Counter, Histogram]] = {}
        metrics = self._metrics
        outcomes, name = self._outcomes, method.full_name

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
                response = await handler(request, call)
            except BaseException as exc:
                code = outcome_of(exc)
                if outcomes is not None:
                    reason = exc.reason if isinstance(exc, DomainError) else code.name
                    outcomes.failed(name, code.name, reason)
                raise
            finally:
                handled, seconds = children(code)
                handled.inc()
                seconds.observe(time.perf_counter() - start)
            if outcomes is not None:
                outcomes.succeeded(name)
            return response

        return handle
