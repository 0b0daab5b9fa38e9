"""The proxy's Prometheus metrics (``--metrics-port``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_TIMES = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class ProxyMetrics:
    """Requests, bytes, active streams, time to first byte and duration, errors by cause."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "tunnelplane_proxy_requests_total",
            "Web requests by status class and outcome (ok, or the proxy's reason).",
            ["code_class", "outcome"],
            registry=registry,
        )
        self.bytes = Counter(
            "tunnelplane_proxy_bytes_total",
            "Body bytes carried: in (web client to local service) and out.",
            ["direction"],
            registry=registry,
        )
        self.active = Gauge(
            "tunnelplane_proxy_active_streams", "Requests being carried now.", registry=registry
        )
        self.first_byte = Histogram(
            "tunnelplane_proxy_first_byte_seconds",
            "From the request's arrival to the response's first body byte.",
            buckets=_TIMES,
            registry=registry,
        )
        self.duration = Histogram(
            "tunnelplane_proxy_request_duration_seconds",
            "From the request's arrival to the response's end.",
            buckets=_TIMES,
            registry=registry,
        )
        self.spare = Gauge(
            "tunnelplane_proxy_spare_exchanges",
            "Exchanges agents hold open, waiting for a request.",
            registry=registry,
        )

    def finished(self, status: int, outcome: str, started: float, now: float) -> None:
        """Count one request."""
        self.requests.labels(f"{status // 100}xx", outcome).inc()
        self.duration.observe(now - started)
