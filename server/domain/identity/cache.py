"""Read-through cache over the shared key/value store, safe against stale refills.

Invalidation writes a short-lived tombstone instead of deleting, and refills use
set-if-absent: a reader that loaded the old value just before a change committed cannot
put it back, because the tombstone is there. Readers that meet a tombstone go to the
source of truth.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from server.domain.identity.ports import KeyValueStore

T = TypeVar("T")
_TOMBSTONE = b"\x00"
_ABSENT = b"\x01"


class CachedLookup(Generic[T]):
    """Caches ``loader`` results (including "absent") under ``prefix:key``."""

    def __init__(
        self,
        kv: KeyValueStore,
        prefix: str,
        *,
        ttl: float,
        encode: Callable[[T], bytes],
        decode: Callable[[bytes], T],
    ) -> None:
        self._kv = kv
        self._prefix = prefix
        self._ttl = ttl
        self._encode = encode
        self._decode = decode
        # Decoding the same cached bytes on every call is measurable on the hot path.
        self._decoded: dict[bytes, T] = {}

    def key(self, key: str) -> str:
        """The store key for ``key``."""
        return f"{self._prefix}:{key}"

    async def get(self, key: str, loader: Callable[[], Awaitable[T | None]]) -> T | None:
        """The cached value, or ``loader()`` stored for next time."""
        (raw,) = await self._kv.get_many([self.key(key)])
        return await self.resolve(key, raw, loader)

    async def resolve(
        self, key: str, raw: bytes | None, loader: Callable[[], Awaitable[T | None]]
    ) -> T | None:
        """Like :meth:`get` for a value already fetched (so callers can batch reads)."""
        if raw is not None and raw != _TOMBSTONE:
            return None if raw == _ABSENT else self._decoded_value(raw)
        value = await loader()
        if raw is None:
            stored = _ABSENT if value is None else self._encode(value)
            await self._kv.set(self.key(key), stored, self._ttl, only_if_absent=True)
        return value

    def _decoded_value(self, raw: bytes) -> T:
        value = self._decoded.get(raw)
        if value is None:
            if len(self._decoded) >= 4096:
                self._decoded.clear()
            value = self._decoded[raw] = self._decode(raw)
        return value

    async def invalidate(self, key: str) -> None:
        """Forget ``key`` everywhere; stale refills are refused until the cache TTL passes."""
        await self._kv.set(self.key(key), _TOMBSTONE, self._ttl)
