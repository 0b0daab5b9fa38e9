"""Shared key/value state: Redis when configured, otherwise an in-process store.

Both implement :class:`server.domain.ports.KeyValueStore` with the same semantics, so the
domain cannot tell them apart. Keys are namespaced with a prefix (``TP_REDIS_PREFIX``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence

import redis.asyncio as aioredis


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

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._data.clear()


class RedisStore:
    """The same store on Redis, shared by every replica."""

    def __init__(self, url: str, prefix: str = "tp:") -> None:
        self._prefix = prefix
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=2.0, socket_connect_timeout=2.0, health_check_interval=15
        )

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

    async def close(self) -> None:
        await self._redis.aclose()
