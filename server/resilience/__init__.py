"""Resilience of the server's outbound calls: circuit breakers (purgatory) and retries with
exponential back-off and full jitter (tenacity), for idempotent operations only."""
