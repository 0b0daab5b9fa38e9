"""De-duplication and rate limits of notices (pure, on a monotonic clock in seconds)."""

from __future__ import annotations

from collections import deque

HOUR = 3600.0


class HourlyLimit:
    """At most ``per_hour`` in any sliding hour."""

    def __init__(self, per_hour: int) -> None:
        self.per_hour = per_hour
        self._sent: deque[float] = deque()

    def take(self, now: float) -> bool:
        """Whether one more may go now (and count it if so)."""
        while self._sent and self._sent[0] <= now - HOUR:
            self._sent.popleft()
        if len(self._sent) >= self.per_hour:
            return False
        self._sent.append(now)
        return True


class Conditions:
    """Which conditions are raised now: a condition is told once when it is raised and
    once when it clears, however many times it is seen in between."""

    def __init__(self) -> None:
        self._active: set[str] = set()

    def raised(self, key: str) -> bool:
        """Seen now: whether this is news (it was not raised)."""
        if key in self._active:
            return False
        self._active.add(key)
        return True

    def cleared(self, key: str) -> bool:
        """Not seen now: whether this is news (it was raised)."""
        if key not in self._active:
            return False
        self._active.discard(key)
        return True

    @property
    def active(self) -> frozenset[str]:
        return frozenset(self._active)
