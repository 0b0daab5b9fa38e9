"""The proxy's Prometheus metrics (``--metrics-port``)."""

from __future__ import annotations

from typing import Any

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
        self.links = Gauge(
            "tunnelplane_proxy_agent_links",
            "Agents' links (WebSocket connections) open to this instance.",
            registry=registry,
        )

    def finished(self, status: int, outcome: str, started: float, now: float) -> None:
        """Count one request."""
        self.requests.labels(f"{status // 100}xx", outcome).inc()
        self.duration.observe(now - started)

    def summary(self) -> dict[str, Any]:
        """What the control plane reads (``/_proxy/stats``): totals since the start, and
        the histograms' cumulative bucket counts by upper bound."""
        by_class: dict[str, int] = {}
        causes: dict[str, int] = {}
        for sample in _samples(self.requests, "_total"):
            labels, value = sample.labels, int(sample.value)
            by_class[labels["code_class"]] = by_class.get(labels["code_class"], 0) + value
            if labels["outcome"] != "ok":
                causes[labels["outcome"]] = causes.get(labels["outcome"], 0) + value
        directions = {s.labels["direction"]: int(s.value) for s in _samples(self.bytes, "_total")}
        return {
            "requests_by_class": by_class,
            "errors_by_cause": causes,
            "bytes_in": directions.get("in", 0),
            "bytes_out": directions.get("out", 0),
            "active": int(next(iter(_samples(self.active, ""))).value),
            "first_byte": _buckets(self.first_byte),
            "duration": _buckets(self.duration),
        }


def _samples(metric: Any, suffix: str) -> list[Any]:
    return [s for family in metric.collect() for s in family.samples if s.name.endswith(suffix)]


def _buckets(histogram: Histogram) -> list[list[float]]:
    """[upper bound (inf as -1), cumulative count] pairs."""
    out = []
    for sample in _samples(histogram, "_bucket"):
        bound = float(sample.labels["le"])
        out.append([-1.0 if bound == float("inf") else bound, sample.value])
    return out
