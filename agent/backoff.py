"""Exponential back-off with full jitter between reconnects."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BackoffPolicy:
    """How long to wait before reconnecting.

    The n-th consecutive failure waits a random time between 0 and
    ``min(cap, initial * 2**n)`` (full jitter); a session that lasted longer than
    ``reset_after`` seconds starts the sequence over.
    """

    initial: float = 0.5
    cap: float = 30.0
    reset_after: float = 30.0


@dataclass
class Backoff:
    """The back-off state of one agent: consecutive failures so far."""

    policy: BackoffPolicy = field(default_factory=BackoffPolicy)
    failures: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self, session_seconds: float) -> float:
        """Delay before the next attempt, after a session that lasted ``session_seconds``."""
        if session_seconds > self.policy.reset_after:
            self.failures = 0
        ceiling = min(self.policy.cap, self.policy.initial * 2.0**self.failures)
        self.failures = min(self.failures + 1, 64)
        return self.rng.uniform(0.0, ceiling)

    def soon(self, within: float) -> float:
        """Delay before reconnecting when the control plane asked for it (it is going
        away): a fresh start, spread over ``within`` seconds (the first step if 0)."""
        self.failures = 0
        return self.rng.uniform(0.0, within if within > 0 else self.policy.initial)

    def at_cap(self) -> float:
        """Delay after an error that retrying soon will not fix."""
        self.failures = min(self.failures + 1, 64)
        return self.policy.cap
