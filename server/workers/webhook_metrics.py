"""The metrics of webhook delivery (:mod:`server.workers.webhooks`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class DispatchMetrics:
    """Prometheus metrics of webhook delivery."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.deliveries = Counter(
            "tunnelplane_webhook_deliveries",
            "Delivery attempts by result (succeeded, retrying, failed), deliveries "
            "held back by an endpoint's rate limit (postponed) or its open circuit "
            "breaker (breaker_open), and deliveries whose endpoint does not open with the "
            "configured secrets keys (unreadable).",
            ["result"],
            registry=registry,
        )
        self.latency = Histogram(
            "tunnelplane_webhook_attempt_seconds",
            "Time from sending a webhook to its answer (or failure).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15),
            registry=registry,
        )
        self.queue_depth = Gauge(
            "tunnelplane_webhook_queue_depth", "Deliveries due now.", registry=registry
        )
        self.oldest_due = Gauge(
            "tunnelplane_webhook_oldest_due_seconds",
            "How long the oldest due delivery has been waiting.",
            registry=registry,
        )
        self.in_flight = Gauge(
            "tunnelplane_webhook_in_flight",
            "Webhook requests this process has in flight.",
            registry=registry,
        )
