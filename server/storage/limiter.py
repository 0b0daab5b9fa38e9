"""Where rate-limit state lives: Redis (shared by every replica) or this process.

One decision is one Lua script run (``EVALSHA``, :mod:`server.storage.limiter_script`):
the address block and the address's bucket (anonymous callers only), the subject's bucket
(with its queue reservation), the monthly quota and its retry de-duplication, checked and
committed atomically. Each script run is written at
once on a dedicated connection and its reply matched in order (:mod:`server.storage.resp`).
The in-process limiter runs the same steps with the same arithmetic
(:func:`server.domain.ratelimit.gcra`); :class:`FallbackLimiter` switches to it while
Redis is unreachable and back when it returns.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from server.domain.limits.model import Check, Decision, Enforcement, GcraResult, IpBlock, Outcome
from server.domain.limits.rules import gcra
from server.storage.limiter_script import (
    DEDUPE_MS,
    KEY_MARGIN_MS,
    LUA,
    SEED_LUA,
    decision_of,
    evalsha_of,
    keys_of,
)
from server.storage.resp import RespConnection

log = logging.getLogger(__name__)
REDIS_TIMEOUT = 0.25


class RedisLimiter:
    """Decisions in Redis: each one ``EVALSHA`` written at once on a dedicated connection
    (:mod:`server.storage.resp`); the admin reads go through redis-py."""

    backend = "redis"

    def __init__(self, client: aioredis.Redis, prefix: str, connection: RespConnection) -> None:
        self._redis = client
        self._prefix = prefix
        self._connection = connection
        self._sha = b""
        self._seed = client.register_script(SEED_LUA)

    async def decide(self, check: Check) -> Decision:
        """One script run (the connection fails it after :data:`REDIS_TIMEOUT`)."""
        connection = self._connection
        if not self._sha:
            self._sha = await connection.execute("SCRIPT", "LOAD", LUA)  # type: ignore[assignment]
        try:
            reply = await connection.execute_encoded(evalsha_of(check, self._prefix, self._sha))
        except NoScriptError:
            self._sha = await connection.execute("SCRIPT", "LOAD", LUA)  # type: ignore[assignment]
            reply = await connection.execute_encoded(evalsha_of(check, self._prefix, self._sha))
        except RedisConnectionError:
            # A connection from before a Redis restart: once more, on a fresh one.
            reply = await connection.execute_encoded(evalsha_of(check, self._prefix, self._sha))
        return decision_of(reply)  # type: ignore[arg-type]

    async def close(self) -> None:
        """Close the dedicated connection."""
        await self._connection.close()

    async def blocks(self) -> list[IpBlock]:
        """Every address blocked now (one SCAN)."""
        found = []
        pattern = f"{self._prefix}ipblock:*"
        async for key in self._redis.scan_iter(match=pattern, count=500):
            value = await self._redis.get(key)
            if value is None:
                continue
            text = value.decode() if isinstance(value, bytes) else str(value)
            name = key.decode() if isinstance(key, bytes) else str(key)
            since, _, until = text.partition(":")
            ip = name[len(self._prefix) + len("ipblock:") :]
            found.append(IpBlock(ip, "ip", float(since), float(until)))
        return found

    async def counter(self, key: str) -> int:
        """A quota counter's value."""
        value = await self._redis.get(f"{self._prefix}{key}")
        return int(value or 0)

    async def seed(self, key: str, amount: int) -> bool:
        """Add ``amount`` to a quota counter, if it exists."""
        added = await self._seed(keys=[f"{self._prefix}{key}"], args=[amount])
        return int(added) >= 0

    async def lift(self, ip: str) -> bool:
        """Delete a block and the address's refusal count."""
        removed = await self._redis.delete(
            f"{self._prefix}ipblock:{ip}", f"{self._prefix}ipviol:{ip}"
        )
        return bool(removed)


class MemoryLimiter:
    """The same decisions in this process (embedded mode, or while Redis is down)."""

    backend = "memory"

    def __init__(self, max_keys: int = 200_000) -> None:
        self._data: OrderedDict[str, tuple[Any, float]] = OrderedDict()
        self._max = max_keys

    def _get(self, key: str, now: float) -> Any:
        item = self._data.get(key)
        if item is None or item[1] <= now:
            self._data.pop(key, None)
            return None
        return item[0]

    def _set(self, key: str, value: Any, ttl_ms: float, now: float) -> None:
        self._data[key] = (value, now + ttl_ms)
        self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)

    async def decide(self, check: Check) -> Decision:
        """Answer ``check`` (no await inside: atomic on the event loop)."""
        now = time.time() * 1000 if check.now_ms is None else float(check.now_ms)
        keys = keys_of(check)
        block = self._get(keys[0], now) if check.by_address else None
        if block is not None:
            left = int(block[1] - now)
            return Decision(Outcome.IP_BLOCKED, 0, left, 0, left)
        ip = gcra(self._get(keys[1], now), now, check.ip_bucket, 1, 0) if check.by_address else None
        if ip is not None and not ip.allowed:
            return Decision(
                Outcome.IP_LIMITED, 0, ip.retry_after_ms, 0, ip.reset_ms, -1,
                self._violation(check, keys, now),
            )  # fmt: skip
        subject = gcra(
            self._get(keys[3], now), now, check.subject_bucket, check.cost, check.max_wait_ms
        )
        if not subject.allowed:
            return Decision(
                Outcome.SUBJECT_LIMITED, 0, subject.retry_after_ms, 0, subject.reset_ms, -1,
                self._violation(check, keys, now),
            )  # fmt: skip
        used, count_it = -1, False
        if check.quota_key and check.quota_limit >= 0:
            used = int(self._get(keys[4], now) or 0)
            count_it = not check.dedupe or self._get(keys[5], now) is None
            if count_it and used + 1 > check.quota_limit:
                reset = int(-(-check.quota_reset_ms // 1))
                return Decision(Outcome.QUOTA_EXCEEDED, 0, reset, 0, reset, used)
        counted = count_it and check.enforcement != Enforcement.DRY_RUN
        if check.enforcement != Enforcement.DRY_RUN:
            used = self._commit(check, keys, now, ip, subject, used, count_it)
        return Decision(
            Outcome.ALLOWED, subject.wait_ms, 0, subject.remaining, subject.reset_ms, used,
            quota_created=counted and used == 1,
        )  # fmt: skip

    def _violation(self, check: Check, keys: list[str], now: float) -> bool:
        """Count a refusal towards blocking the address; whether it is blocked now."""
        if check.enforcement != Enforcement.ENFORCE or not check.by_address:
            return False
        count = (self._get(keys[2], now) or 0) + 1
        expires = self._data[keys[2]][1] if count > 1 else now + check.block.window_ms
        self._data[keys[2]] = (count, expires)
        if count < check.block.after:
            return False
        until = now + check.block.duration_ms
        self._set(keys[0], (now, until), check.block.duration_ms, now)
        self._data.pop(keys[2], None)
        return True

    def _commit(
        self,
        check: Check,
        keys: list[str],
        now: float,
        ip: GcraResult | None,
        subject: GcraResult,
        used: int,
        count_it: bool,
    ) -> int:
        if ip is not None:
            self._set(keys[1], ip.tat, -(-(ip.tat - now) // 1) + KEY_MARGIN_MS, now)
        self._set(keys[3], subject.tat, -(-(subject.tat - now) // 1) + KEY_MARGIN_MS, now)
        if not count_it:
            return used
        self._set(keys[4], used + 1, check.quota_reset_ms + 86_400_000, now)
        if check.dedupe:
            self._set(keys[5], 1, DEDUPE_MS, now)
        return used + 1

    async def blocks(self) -> list[IpBlock]:
        """Every address blocked now."""
        now = time.time() * 1000
        return [
            IpBlock(key[len("ipblock:") :], "ip", value[0], value[1])
            for key, (value, expires) in list(self._data.items())
            if key.startswith("ipblock:") and expires > now
        ]

    async def counter(self, key: str) -> int:
        """A quota counter's value."""
        return int(self._get(key, time.time() * 1000) or 0)

    async def seed(self, key: str, amount: int) -> bool:
        """Add ``amount`` to a quota counter, if it exists (a counter past its expiry is
        dropped by the next decision, as if it had never been seeded)."""
        item = self._data.get(key)
        if item is None:
            return False
        self._data[key] = (item[0] + amount, item[1])
        return True

    async def lift(self, ip: str) -> bool:
        """Delete a block."""
        self._data.pop(f"ipviol:{ip}", None)
        return self._data.pop(f"ipblock:{ip}", None) is not None


class FallbackLimiter:
    """Redis while it answers; this process's limiter while it does not."""

    def __init__(
        self,
        primary: RedisLimiter | None,
        local: MemoryLimiter,
        on_switch: Callable[[str], None] = lambda _backend: None,
        on_error: Callable[[], None] = lambda: None,
    ) -> None:
        self._on_error = on_error
        self._failed_at = -math.inf
        self._primary = primary
        self._local = local
        self._up = primary is not None
        self._on_switch = on_switch

    @property
    def backend(self) -> str:
        """The backend deciding now."""
        return "redis" if self._up else "memory"

    def set_available(self, up: bool, probed_at: float = math.inf, error: str = "") -> None:
        """Told by the health monitor whether Redis answers its probes (an "up" from a
        probe that started before the last failure here is stale, and ignored)."""
        if not up:
            self._failed_at = time.monotonic()
        if self._primary is None or up == self._up or (up and probed_at < self._failed_at):
            return
        self._up = up
        log.warning(
            "rate limiter now uses %s",
            self.backend,
            extra={"backend": self.backend, "error": error},
        )
        self._on_switch(self.backend)

    async def decide(self, check: Check) -> Decision:
        """Decide in Redis; on a Redis failure, switch and decide locally."""
        if self._primary is not None and self._up:
            try:
                return await self._primary.decide(check)
            except ResponseError as exc:
                # Redis answered: not an outage but a bug or a refusal (e.g. out of memory).
                # Loud, decided locally, and Redis stays in use for the next call.
                log.exception("rate limiter script failed", extra={"error": str(exc)})
                self._on_error()
            except (RedisError, OSError, TimeoutError) as exc:
                self.set_available(False, error=repr(exc))
        return await self._local.decide(check)

    async def blocks(self) -> list[IpBlock]:
        """Blocks from the backend in use."""
        if self._primary is not None and self._up:
            return await self._primary.blocks()
        return await self._local.blocks()

    async def counter(self, key: str) -> int:
        """A quota counter from the backend in use."""
        if self._primary is not None and self._up:
            try:
                return await self._primary.counter(key)
            except (RedisError, OSError, TimeoutError) as exc:
                self.set_available(False, error=repr(exc))
        return await self._local.counter(key)

    async def seed(self, key: str, amount: int) -> bool:
        """Add to a quota counter in the backend in use."""
        if self._primary is not None and self._up:
            try:
                return await self._primary.seed(key, amount)
            except (RedisError, OSError, TimeoutError) as exc:
                self.set_available(False, error=repr(exc))
        return await self._local.seed(key, amount)

    async def close(self) -> None:
        """Close Redis connections."""
        if self._primary is not None:
            await self._primary.close()

    async def lift(self, ip: str) -> bool:
        """Lift a block everywhere it may be."""
        lifted = await self._local.lift(ip)
        if self._primary is not None and self._up:
            lifted = await self._primary.lift(ip) or lifted
        return lifted
