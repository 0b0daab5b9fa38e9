"""Shared key/value state: Redis when configured, otherwise an in-process store.

Both implement :class:`server.domain.identity.ports.KeyValueStore` with the same semantics, so the
domain cannot tell them apart. Keys are namespaced with a prefix (``TP_REDIS_PREFIX``).
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger("tunnelplane.kv")


class MemoryStore:
    """In-process store with expiry, bounded so that a flood of keys cannot exhaust memory."""

    def __init__(self, max_entries: int = 200_000) -> None:
        self._data: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._max = max_entries

    def _live(self, key: str, now: float) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[1] <= now:
            del self._data[key]
            return None
        return item[0]

    def _put(self, key: str, value: bytes, expires: float) -> None:
        self._data[key] = (value, expires)
        self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        now = time.monotonic()
        return [self._live(key, now) for key in keys]

    async def set(
        self, key: str, value: bytes, ttl: float, *, only_if_absent: bool = False
    ) -> bool:
        now = time.monotonic()
        if only_if_absent and self._live(key, now) is not None:
            return False
        self._put(key, value, now + ttl)
        return True

    async def delete(self, *keys: str) -> None:
        for key in keys:
            self._data.pop(key, None)

    async def incr(self, key: str, ttl: float) -> int:
        now = time.monotonic()
        current = self._live(key, now)
        if current is None:
            self._put(key, b"1", now + ttl)
            return 1
        value = int(current) + 1
        self._data[key] = (str(value).encode(), self._data[key][1])
        return value

    @property
    def degraded(self) -> bool:
        """Never: there is nothing to fall back from."""
        return False

    def entry(self, key: str) -> tuple[bytes, float] | None:
        """A live key's value and remaining TTL in seconds."""
        now = time.monotonic()
        value = self._live(key, now)
        return None if value is None else (value, self._data[key][1] - now)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._data.clear()


def redis_client(url: str) -> aioredis.Redis:
    """A Redis client whose calls fail fast when Redis is unreachable."""
    return aioredis.Redis.from_url(
        url, socket_timeout=1.0, socket_connect_timeout=1.0, health_check_interval=15
    )


class RedisStore:
    """The same store on Redis, shared by every replica."""

    def __init__(self, client: aioredis.Redis, prefix: str = "tp:") -> None:
        self._prefix = prefix
        self._redis = client

    @classmethod
    def connect(cls, url: str, prefix: str = "tp:") -> RedisStore:
        """A store with its own connection pool."""
        return cls(redis_client(url), prefix)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        values = await self._redis.mget([self._prefix + key for key in keys])
        return [v.encode() if isinstance(v, str) else v for v in values]

    async def set(
        self, key: str, value: bytes, ttl: float, *, only_if_absent: bool = False
    ) -> bool:
        result = await self._redis.set(
            self._prefix + key, value, px=max(int(ttl * 1000), 1), nx=only_if_absent
        )
        return bool(result)

    async def delete(self, *keys: str) -> None:
        if keys:
            await self._redis.delete(*(self._prefix + key for key in keys))

    async def incr(self, key: str, ttl: float) -> int:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incr(self._prefix + key)
            pipe.pexpire(self._prefix + key, max(int(ttl * 1000), 1), nx=True)
            value, _ = await pipe.execute()
        return int(value)

    async def ping(self) -> None:
        await self._redis.ping()

    @property
    def degraded(self) -> bool:
        """Never on its own; :class:`ResilientStore` reports outages."""
        return False

    async def close(self) -> None:
        await self._redis.aclose()


#: While degraded, refilled cache entries live this long at most: other replicas cannot
#: invalidate this process's copy then.
DEGRADED_CACHE_TTL = 5.0
JOURNAL_LIMIT = 50_000


class ResilientStore:
    """Redis while it answers; this process's store while it does not.

    Callers see no errors when Redis goes away: reads and writes move to the in-process
    store (cache misses fall through to the database, the source of truth). Writes made
    meanwhile (revocations, tombstones, counters) are journalled and written to Redis
    when it returns, before Redis is used again.
    """

    def __init__(self, redis: RedisStore, local: MemoryStore) -> None:
        self._redis = redis
        self._local = local
        self._up = True
        self._journal: OrderedDict[str, None] = OrderedDict()
        self._lost = False
        self._failed_at = -math.inf

    @property
    def degraded(self) -> bool:
        """Whether the in-process store is standing in for Redis."""
        return not self._up

    def _down(self) -> None:
        self._failed_at = time.monotonic()
        if self._up:
            self._up = False
            log.warning("shared state moved in-process: Redis is unreachable")

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if self._up:
            try:
                return await self._redis.get_many(keys)
            except _REDIS_DOWN:
                self._down()
        return await self._local.get_many(keys)

    async def set(
        self, key: str, value: bytes, ttl: float, *, only_if_absent: bool = False
    ) -> bool:
        if self._up:
            try:
                return await self._redis.set(key, value, ttl, only_if_absent=only_if_absent)
            except _REDIS_DOWN:
                self._down()
        if only_if_absent:
            # A cache refill: keep it short, since no other replica can invalidate it.
            return await self._local.set(
                key, value, min(ttl, DEGRADED_CACHE_TTL), only_if_absent=True
            )
        self._note(key)
        return await self._local.set(key, value, ttl)

    async def delete(self, *keys: str) -> None:
        if self._up:
            try:
                await self._redis.delete(*keys)
            except _REDIS_DOWN:
                self._down()
            else:
                return
        for key in keys:
            self._note(key)
        await self._local.delete(*keys)

    async def incr(self, key: str, ttl: float) -> int:
        if self._up:
            try:
                return await self._redis.incr(key, ttl)
            except _REDIS_DOWN:
                self._down()
        self._note(key)
        return await self._local.incr(key, ttl)

    async def ping(self) -> None:
        await self._redis.ping()

    async def set_available(self, up: bool, probed_at: float = math.inf) -> None:
        """Told by the health monitor; on recovery, replay the journal first. An "up" from
        a probe that started before the last failure seen here is stale, and ignored."""
        if not up:
            self._down()
            return
        if self._up or probed_at < self._failed_at:
            return
        try:
            await self._replay()
        except _REDIS_DOWN:
            return
        self._up = True
        log.warning("shared state is back in Redis")

    def _note(self, key: str) -> None:
        self._journal[key] = None
        self._journal.move_to_end(key)
        if len(self._journal) > JOURNAL_LIMIT:
            self._journal.popitem(last=False)
            self._lost = True

    async def _replay(self) -> None:
        for key in list(self._journal):
            entry = self._local.entry(key)
            if entry is None:
                await self._redis.delete(key)
            else:
                value, ttl = entry
                await self._redis.set(key, value, ttl)
            self._journal.pop(key, None)
        if self._lost:
            log.error("journal overflowed during the Redis outage; some writes were not replayed")
            self._lost = False

    async def close(self) -> None:
        await self._redis.close()
        await self._local.close()


_REDIS_DOWN = (RedisError, OSError, TimeoutError)
