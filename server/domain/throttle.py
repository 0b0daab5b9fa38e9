"""Login throttling: failures are counted per account and per client address.

After a few failures an account's next attempt must wait (1 s, 2 s, 4 s ... up to a
minute); after more it is locked for a while. A client address that fails across many
accounts is locked the same way. Counters live in the shared key/value store, so every
replica sees the same counts. Attempts are refused before the password is checked.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from server.domain.clock import Clock
from server.domain.ports import KeyValueStore
from server.errors import ResourceExhausted

MAX_DELAY = 60.0


@dataclass(frozen=True, slots=True)
class ThrottlePolicy:
    """Thresholds, from settings."""

    window: float
    slowdown_after: int
    lock_after: int
    ip_lock_after: int
    lock_duration: float


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:32]


class LoginThrottle:
    """Decides whether a sign-in attempt may proceed and records its outcome."""

    def __init__(self, kv: KeyValueStore, policy: ThrottlePolicy, clock: Clock) -> None:
        self._kv = kv
        self._policy = policy
        self._clock = clock

    async def check(self, email: str, ip: str) -> None:
        """Refuse with ``RESOURCE_EXHAUSTED`` while the account or address must wait."""
        keys = [f"login:wait:a:{_digest(email)}", f"login:wait:i:{_digest(ip)}"]
        now = self._clock.time()
        for raw in await self._kv.get_many(keys):
            if raw is None:
                continue
            kind, _, until_text = raw.decode().partition(":")
            until = float(until_text)
            if until > now:
                locked = kind == "L"
                raise ResourceExhausted(
                    "too many failed sign-in attempts; "
                    + ("temporarily locked" if locked else "slow down"),
                    retry_after=until - now,
                    reason="LOGIN_LOCKED" if locked else "LOGIN_THROTTLED",
                )

    async def failed(self, email: str, ip: str) -> None:
        """Count a failure and set the wait that follows it."""
        policy = self._policy
        account_failures = await self._kv.incr(f"login:fail:a:{_digest(email)}", policy.window)
        ip_failures = await self._kv.incr(f"login:fail:i:{_digest(ip)}", policy.window)
        await self._set_wait(f"login:wait:a:{_digest(email)}", account_failures, policy.lock_after)
        await self._set_wait(f"login:wait:i:{_digest(ip)}", ip_failures, policy.ip_lock_after)

    async def succeeded(self, email: str) -> None:
        """Clear the account's failures (the address keeps its count)."""
        digest = _digest(email)
        await self._kv.delete(f"login:fail:a:{digest}", f"login:wait:a:{digest}")

    async def _set_wait(self, key: str, failures: int, lock_after: int) -> None:
        policy = self._policy
        if failures >= lock_after:
            kind, wait = "L", policy.lock_duration
        elif failures >= policy.slowdown_after and key.startswith("login:wait:a:"):
            kind, wait = "S", min(2.0 ** (failures - policy.slowdown_after), MAX_DELAY)
        else:
            return
        until = self._clock.time() + wait
        await self._kv.set(key, f"{kind}:{until}".encode(), wait)
