"""Login throttling (per account and per address) and the purge of soft-deleted users,
with a clock the test moves instead of waiting."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2

from server.app import App
from server.domain.throttle import LoginThrottle, ThrottlePolicy
from server.errors import ResourceExhausted
from server.storage.kv import MemoryStore, RedisStore
from tests.conftest import REDIS_URL, Backend, redis_prefix, require_redis
from tests.helpers import PASSWORD, Client, detail, fails, reason, unique_email


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self) -> None:
        self._now = datetime(2026, 1, 1, tzinfo=UTC)

    def now(self) -> datetime:
        return self._now

    def time(self) -> float:
        return self._now.timestamp()

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)


POLICY = ThrottlePolicy(
    window=900, slowdown_after=2, lock_after=4, ip_lock_after=6, lock_duration=600
)


@pytest.fixture(params=["memory", "redis"])
async def throttle(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[LoginThrottle, FakeClock]]:
    clock = FakeClock()
    if request.param == "memory":
        kv: MemoryStore | RedisStore = MemoryStore()
    else:
        require_redis()
        kv = RedisStore.connect(REDIS_URL, redis_prefix())
    yield LoginThrottle(kv, POLICY, clock), clock
    await kv.close()


async def test_failures_slow_down_then_lock_an_account(
    throttle: tuple[LoginThrottle, FakeClock],
) -> None:
    limiter, clock = throttle
    for _ in range(POLICY.slowdown_after):
        await limiter.check("ann@example.com", "10.0.0.1")
        await limiter.failed("ann@example.com", "10.0.0.1")
    with pytest.raises(ResourceExhausted) as slowed:
        await limiter.check("ann@example.com", "10.0.0.2")  # another address: same account
    assert slowed.value.reason == "LOGIN_THROTTLED"
    assert 0 < (slowed.value.retry_after or 0) <= 1
    await limiter.check("bob@example.com", "10.0.0.1")  # other accounts are not slowed
    clock.advance(1.01)
    await limiter.check("ann@example.com", "10.0.0.1")
    await limiter.failed("ann@example.com", "10.0.0.1")  # third failure: wait doubles
    with pytest.raises(ResourceExhausted) as doubled:
        await limiter.check("ann@example.com", "10.0.0.1")
    assert 1 < (doubled.value.retry_after or 0) <= 2
    clock.advance(2.01)
    await limiter.failed("ann@example.com", "10.0.0.1")  # fourth: locked
    with pytest.raises(ResourceExhausted) as locked:
        await limiter.check("ann@example.com", "10.0.0.1")
    assert locked.value.reason == "LOGIN_LOCKED"
    assert (locked.value.retry_after or 0) > 500
    clock.advance(POLICY.lock_duration + 1)
    await limiter.check("ann@example.com", "10.0.0.1")


async def test_an_address_failing_across_accounts_is_locked(
    throttle: tuple[LoginThrottle, FakeClock],
) -> None:
    limiter, _clock = throttle
    for i in range(POLICY.ip_lock_after):
        await limiter.failed(f"user{i}@example.com", "10.9.9.9")
    with pytest.raises(ResourceExhausted) as locked:
        await limiter.check("fresh@example.com", "10.9.9.9")
    assert locked.value.reason == "LOGIN_LOCKED"
    await limiter.check("fresh@example.com", "10.9.9.10")


async def test_success_clears_the_account(throttle: tuple[LoginThrottle, FakeClock]) -> None:
    limiter, _clock = throttle
    for _ in range(POLICY.slowdown_after):
        await limiter.failed("cy@example.com", "10.0.0.1")
    await limiter.succeeded("cy@example.com")
    await limiter.check("cy@example.com", "10.0.0.3")


@pytest.fixture
async def clocked(backend: Backend, tmp_path: Path) -> AsyncIterator[tuple[App, FakeClock]]:
    """A server of its own with a movable clock and a low throttle."""
    clock = FakeClock()
    settings = backend.settings(
        tmp_path,
        login_slowdown_after=2,
        login_lock_after=3,
        redis_prefix=redis_prefix(),
        access_token_ttl=10**8,  # the fake clock stands still in 2026
    )
    server = App(settings, clock=clock)
    await server.start()
    yield server, clock
    await server.stop(grace=0)


async def test_login_is_throttled_end_to_end(clocked: tuple[App, FakeClock]) -> None:
    server, clock = clocked
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        client = Client(server, channel)
        email = unique_email()
        await client.register(email)
        for _ in range(2):
            await fails(client.login(email, "wrong password!!"), grpc.StatusCode.UNAUTHENTICATED)
        # Even the right password is refused while the account must wait: no oracle.
        error = await fails(client.login(email), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert reason(error) == "LOGIN_THROTTLED"
        assert detail(error, error_details_pb2.RetryInfo).retry_delay.seconds <= 1
        clock.advance(1.5)
        await fails(client.login(email, "wrong password!!"), grpc.StatusCode.UNAUTHENTICATED)
        clock.advance(3)
        locked = await fails(client.login(email), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert reason(locked) == "LOGIN_LOCKED"
        clock.advance(901)
        assert (await client.login(email)).tokens.access_token


async def test_soft_deleted_users_are_purged_after_retention(
    clocked: tuple[App, FakeClock],
) -> None:
    server, clock = clocked
    user = await server.accounts.register(unique_email("purge"), PASSWORD, "")
    deleted = await server.users.delete(user.id, etag="", purge=False)
    assert deleted.purge_time == clock.now() + timedelta(days=30)
    assert await server.users.purge_expired() == 0
    restored = await server.users.undelete(user.id, etag="")
    assert restored.state.value == "active"
    await server.users.delete(user.id, etag="", purge=False)
    clock.advance(timedelta(days=30, seconds=1).total_seconds())
    assert await server.users.purge_expired() >= 1
    async with server.db(readonly=True) as uow:
        assert await uow.users.get(user.id) is None
