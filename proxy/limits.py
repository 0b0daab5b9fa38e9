"""What an instance admits: at most ``max_connections`` requests at once and a token
bucket of ``rate`` requests per second with ``burst`` above it (a proxy's config sets
both; 0 turns either off)."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """``rate`` tokens a second, holding at most ``burst`` (GCRA-equivalent)."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate, self.burst = rate, max(burst, 1)
        self._clock = clock
        self._tokens = float(self.burst)
        self._at = clock()

    def take(self) -> float:
        """0 when a token was taken; else the seconds until one is there."""
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate


class Admission:
    """Concurrency and rate limits of one instance."""

    def __init__(self, max_connections: int, rate: float, burst: int) -> None:
        self.max_connections = max_connections
        self._bucket = TokenBucket(rate, burst) if rate > 0 else None
        self.active = 0

    def refusal(self) -> tuple[int, str, float] | None:
        """(status, reason, retry after) when a new request must wait; None to admit it
        (and count it active until :meth:`done`)."""
        if self.max_connections and self.active >= self.max_connections:
            return 503, "TOO_MANY_CONNECTIONS", 1.0
        if self._bucket is not None and (wait := self._bucket.take()) > 0:
            return 429, "RATE_LIMITED", wait
        self.active += 1
        return None

    def done(self) -> None:
        """A request admitted by :meth:`refusal` ended."""
        self.active -= 1
