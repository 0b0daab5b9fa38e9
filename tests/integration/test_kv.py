"""The in-process store and the Redis store behave the same (a real Redis)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from server.domain.identity.cache import CachedLookup
from server.storage.kv import MemoryStore, RedisStore
from tests.conftest import REDIS_URL, redis_prefix, require_redis


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[MemoryStore | RedisStore]:
    if request.param == "memory":
        kv: MemoryStore | RedisStore = MemoryStore()
    else:
        require_redis()
        kv = RedisStore.connect(REDIS_URL, redis_prefix())
    yield kv
    await kv.close()


async def test_set_get_delete(store: MemoryStore | RedisStore) -> None:
    assert await store.get_many(["a", "b"]) == [None, None]
    assert await store.set("a", b"1", 10)
    assert await store.get_many(["a", "b"]) == [b"1", None]
    assert not await store.set("a", b"2", 10, only_if_absent=True)
    assert await store.get_many(["a"]) == [b"1"]
    await store.delete("a", "missing")
    assert await store.get_many(["a"]) == [None]


async def test_values_expire(store: MemoryStore | RedisStore) -> None:
    await store.set("short", b"x", 0.05)
    await store.set("long", b"y", 30)
    await asyncio.sleep(0.2)  # expiry is the behaviour under test
    assert await store.get_many(["short", "long"]) == [None, b"y"]


async def test_incr_counts_and_keeps_its_first_expiry(store: MemoryStore | RedisStore) -> None:
    assert [await store.incr("n", 30) for _ in range(3)] == [1, 2, 3]
    assert await store.incr("m", 0.05) == 1
    assert await store.incr("m", 30) == 2  # does not extend the window
    await asyncio.sleep(0.2)
    assert await store.incr("m", 30) == 1


async def test_cached_lookup_refuses_stale_refill(store: MemoryStore | RedisStore) -> None:
    cache: CachedLookup[str] = CachedLookup(
        store, "c", ttl=30, encode=str.encode, decode=bytes.decode
    )
    source = {"k": "old"}

    async def load() -> str | None:
        return source.get("k")

    assert await cache.get("k", load) == "old"
    source["k"] = "new"
    assert await cache.get("k", load) == "old"  # cached
    await cache.invalidate("k")
    # A reader that loaded "old" before the change cannot put it back now.
    assert not await store.set(cache.key("k"), b"old", 30, only_if_absent=True)
    assert await cache.get("k", load) == "new"
    source.pop("k")
    await cache.invalidate("k")
    assert await cache.get("k", load) is None


def test_memory_store_is_bounded() -> None:
    async def fill() -> list[bytes | None]:
        kv = MemoryStore(max_entries=100)
        for i in range(1000):
            await kv.set(f"k{i}", b"v", 60)
        return await kv.get_many(["k0", "k999"])

    assert asyncio.run(fill()) == [None, b"v"]


def test_a_run_deletes_its_own_keys_and_no_one_elses() -> None:
    """What the session's clean-up does: every key under this run's prefix goes (quota
    counters would otherwise stay for weeks), keys outside it stay."""
    require_redis()
    import redis

    from tests.conftest import REDIS_RUN_PREFIX, delete_run_keys

    client = redis.Redis.from_url(REDIS_URL)
    mine = [f"{redis_prefix()}quota:requests:usr_x:{i}" for i in range(1200)]
    other = f"tptest-other-run:{uuid.uuid4().hex}"
    try:
        client.mset(dict.fromkeys([*mine, other], b"1"))
        assert delete_run_keys() >= len(mine)
        assert client.exists(*mine) == 0
        assert not list(client.scan_iter(match=f"{REDIS_RUN_PREFIX}*"))
        assert client.exists(other) == 1
    finally:
        client.unlink(other)
        client.close()
