"""Login throttling: failures are counted per account, per (account, address) and per
address.

After a few failures an account's next attempt must wait, from any address (1 s, 2 s,
4 s ... up to a minute): guessing one password from many addresses stays slow. Locks are
narrower, so that failures are no lever to lock someone else out: enough failures for one
account from one address lock that address out of that account for a while, and an
address that fails across many accounts is locked out of all of them. The owner signing in
from an address that has not failed is never locked out, only spaced like everyone else.
Counters live in the shared key/value store, so every replica sees the same counts.
Attempts are refused before the password is checked.

The same throttle guards other passwords under a key prefix of their own: the basic
credentials of tunnels (``basic``), where the "account" is the tunnel.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from server.domain.common.clock import Clock
from server.domain.common.errors import ResourceExhausted
from server.domain.identity.ports import KeyValueStore

MAX_DELAY = 60.0
_LOCK, _SLOW = "L", "S"


@dataclass(frozen=True, slots=True)
class ThrottlePolicy:
    """Thresholds, from settings."""

    window: float
    slowdown_after: int
    #: Failures for one account from one address that lock that address out of it.
    lock_after: int
    ip_lock_after: int
    lock_duration: float


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class _Keys:
    """Where the counters and waits of one attempt live: ``{prefix}:{fail|wait}:{kind}:…``
    for the account (``a``), the (account, address) pair (``p``) and the address (``i``)."""

    prefix: str
    account: str
    pair: str
    address: str

    @classmethod
    def of(cls, prefix: str, email: str, ip: str) -> _Keys:
        account, address = _digest(email), _digest(ip)
        return cls(prefix, account, f"{account}:{address}", address)

    def key(self, what: str, kind: str) -> str:
        """The ``fail`` counter or the ``wait`` of the account, pair or address."""
        subject = {"a": self.account, "p": self.pair, "i": self.address}[kind]
        return f"{self.prefix}:{what}:{kind}:{subject}"

    @property
    def waits(self) -> list[str]:
        return [self.key("wait", "a"), self.key("wait", "p"), self.key("wait", "i")]


class LoginThrottle:
    """Decides whether a sign-in attempt may proceed and records its outcome."""

    def __init__(
        self, kv: KeyValueStore, policy: ThrottlePolicy, clock: Clock, *, prefix: str = "login"
    ) -> None:
        self._kv = kv
        self._policy = policy
        self._clock = clock
        self._prefix = prefix

    async def check(self, email: str, ip: str) -> None:
        """Refuse with ``RESOURCE_EXHAUSTED`` while this account, this address, or this
        address for this account must wait (a lock is reported before a slowdown)."""
        now = self._clock.time()
        waits = []
        for raw in await self._kv.get_many(_Keys.of(self._prefix, email, ip).waits):
            if raw is not None:
                kind, _, until_text = raw.decode().partition(":")
                if float(until_text) > now:
                    waits.append((kind == _LOCK, float(until_text)))
        if not waits:
            return
        locked, until = max(waits)
        raise ResourceExhausted(
            "too many failed sign-in attempts; "
            + ("temporarily locked" if locked else "slow down"),
            retry_after=until - now,
            reason="LOGIN_LOCKED" if locked else "LOGIN_THROTTLED",
        )

    async def failed(self, email: str, ip: str) -> None:
        """Count a failure and set the waits that follow it."""
        policy, keys = self._policy, _Keys.of(self._prefix, email, ip)
        account = await self._kv.incr(keys.key("fail", "a"), policy.window)
        pair = await self._kv.incr(keys.key("fail", "p"), policy.window)
        address = await self._kv.incr(keys.key("fail", "i"), policy.window)
        if account >= policy.slowdown_after:
            delay = min(2.0 ** (account - policy.slowdown_after), MAX_DELAY)
            await self._wait(keys.key("wait", "a"), _SLOW, delay)
        if pair >= policy.lock_after:
            await self._wait(keys.key("wait", "p"), _LOCK, policy.lock_duration)
        if address >= policy.ip_lock_after:
            await self._wait(keys.key("wait", "i"), _LOCK, policy.lock_duration)

    async def succeeded(self, email: str, ip: str) -> None:
        """Clear the account's failures and this address's for it (the address keeps its
        own count, and other addresses theirs for this account)."""
        keys = _Keys.of(self._prefix, email, ip)
        await self._kv.delete(
            keys.key("fail", "a"),
            keys.key("wait", "a"),
            keys.key("fail", "p"),
            keys.key("wait", "p"),
        )

    async def _wait(self, key: str, kind: str, seconds: float) -> None:
        until = self._clock.time() + seconds
        await self._kv.set(key, f"{kind}:{until}".encode(), seconds)
