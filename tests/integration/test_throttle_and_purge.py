"""Login throttling (per account and per address) and the purge of soft-deleted users,
with a clock the test moves instead of waiting."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import httpx
import pytest
import sqlalchemy as sa
from google.rpc import error_details_pb2
from tunnelplane.v1 import auth_pb2

from server.app import App
from server.domain.common.errors import ResourceExhausted
from server.domain.identity.throttle import MAX_DELAY, LoginThrottle, ThrottlePolicy
from server.storage.kv import MemoryStore, RedisStore
from server.storage.tables import audit_log
from tests.conftest import REDIS_URL, Backend, redis_prefix, require_redis, started
from tests.helpers import PASSWORD, Client, FakeClock, detail, fails, reason, unique_email

#: Where the tests' fake clocks start.
START = datetime(2026, 1, 1, tzinfo=UTC)


POLICY = ThrottlePolicy(
    window=900, slowdown_after=2, lock_after=4, ip_lock_after=6, lock_duration=600
)


@pytest.fixture(params=["memory", "redis"])
async def throttle(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[LoginThrottle, FakeClock]]:
    clock = FakeClock(START)
    if request.param == "memory":
        kv: MemoryStore | RedisStore = MemoryStore()
    else:
        require_redis()
        kv = RedisStore.connect(REDIS_URL, redis_prefix())
    yield LoginThrottle(kv, POLICY, clock), clock
    await kv.close()


async def test_failures_slow_down_an_account_then_lock_the_address_out_of_it(
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
    # Another address is only spaced out (the fourth failure: 4 s), never locked.
    with pytest.raises(ResourceExhausted) as spaced:
        await limiter.check("ann@example.com", "10.0.0.2")
    assert spaced.value.reason == "LOGIN_THROTTLED"
    clock.advance(4.01)
    await limiter.check("ann@example.com", "10.0.0.2")
    with pytest.raises(ResourceExhausted):
        await limiter.check("ann@example.com", "10.0.0.1")
    clock.advance(POLICY.lock_duration + 1)
    await limiter.check("ann@example.com", "10.0.0.1")


async def test_failures_from_rotating_addresses_lock_no_one_out(
    throttle: tuple[LoginThrottle, FakeClock],
) -> None:
    limiter, clock = throttle
    addresses = [f"10.1.0.{i}" for i in range(3 * POLICY.lock_after)]
    for address in addresses:
        await limiter.check("dee@example.com", address)
        await limiter.failed("dee@example.com", address)
        clock.advance(MAX_DELAY + 0.01)  # the account's spacing, never more
    for address in [*addresses, "10.2.0.1"]:
        await limiter.check("dee@example.com", address)
    await limiter.failed("dee@example.com", addresses[0])
    with pytest.raises(ResourceExhausted) as spaced:
        await limiter.check("dee@example.com", "10.2.0.1")
    assert spaced.value.reason == "LOGIN_THROTTLED"
    assert (spaced.value.retry_after or 0) <= MAX_DELAY


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
    await limiter.succeeded("cy@example.com", "10.0.0.1")
    await limiter.check("cy@example.com", "10.0.0.3")


async def test_success_keeps_other_addresses_locked(
    throttle: tuple[LoginThrottle, FakeClock],
) -> None:
    limiter, clock = throttle
    for _ in range(POLICY.lock_after):
        await limiter.failed("eve@example.com", "10.6.6.6")
    clock.advance(MAX_DELAY + 0.01)
    await limiter.check("eve@example.com", "10.0.0.1")
    await limiter.succeeded("eve@example.com", "10.0.0.1")
    with pytest.raises(ResourceExhausted) as locked:
        await limiter.check("eve@example.com", "10.6.6.6")
    assert locked.value.reason == "LOGIN_LOCKED"


@pytest.fixture
async def clocked(backend: Backend, tmp_path: Path) -> AsyncIterator[tuple[App, FakeClock]]:
    """A server of its own with a movable clock and a low throttle."""
    clock = FakeClock(START)
    settings = backend.settings(
        tmp_path,
        login_slowdown_after=2,
        login_lock_after=3,
        # The test is the proxy: its X-Forwarded-For says which address a call comes from.
        trusted_proxies="127.0.0.0/8",
        redis_prefix=redis_prefix(),
        access_token_ttl=10**8,  # the fake clock stands still in 2026
    )
    async with started(settings, clock) as server:
        yield server, clock


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


@dataclass(frozen=True)
class Attempt:
    """How a sign-in attempt ended: a status name, its reason, and RetryInfo seconds."""

    status: str
    reason: str = ""
    retry_after: float = 0.0


async def sign_in(server: App, transport: str, email: str, password: str, address: str) -> Attempt:
    """One Login from ``address`` (as a trusted proxy forwards it), over ``transport``."""
    if transport == "http":
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}") as http:
            response = await http.post(
                "/v1/auth:login",
                json={"email": email, "password": password},
                headers={"x-forwarded-for": address},
            )
        if response.status_code == 200:
            return Attempt("OK")
        status = {401: "UNAUTHENTICATED", 429: "RESOURCE_EXHAUSTED"}[response.status_code]
        retry = float(response.headers.get("retry-after", "0"))
        return Attempt(status, response.json()["details"][0]["reason"], retry)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        call = Client(server, channel).auth.Login(
            auth_pb2.LoginRequest(email=email, password=password),
            metadata=(("x-forwarded-for", address),),
        )
        try:
            await call
        except grpc.aio.AioRpcError as error:
            retry = detail(error, error_details_pb2.RetryInfo)
            seconds = retry.retry_delay.ToTimedelta().total_seconds() if retry else 0.0
            return Attempt(error.code().name, reason(error), seconds)
    return Attempt("OK")


FAILED = Attempt("UNAUTHENTICATED", "INVALID_CREDENTIALS")


async def login_attempts(server: App, addresses: set[str]) -> int:
    """Audit entries of Login calls from ``addresses``."""
    async with server.db.engine.connect() as conn:
        return int(
            await conn.scalar(
                sa.select(sa.func.count())
                .select_from(audit_log)
                .where(
                    audit_log.c.method == "/tunnelplane.v1.AuthService/Login",
                    audit_log.c.ip_address.in_(addresses),
                )
            )
            or 0
        )


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_failures_from_many_addresses_lock_neither_the_owner_nor_them(
    clocked: tuple[App, FakeClock], transport: str
) -> None:
    server, clock = clocked
    email = unique_email("target")
    await server.identity.accounts.register(email, PASSWORD, "")
    tag = uuid.uuid4().int % 200
    attackers = [f"203.0.{tag}.{i}" for i in range(1, 3 * 3 + 1)]  # three times lock_after
    for address in attackers:
        assert await sign_in(server, transport, email, "wrong password!!", address) == FAILED
        clock.advance(61)  # the account's spacing (at most a minute), never a lock
    assert await sign_in(server, transport, email, "wrong password!!", attackers[0]) == FAILED
    # Right after a failure the account is spaced out for everyone, locked for no one.
    owner = await sign_in(server, transport, email, PASSWORD, "198.51.100.7")
    assert (owner.status, owner.reason) == ("RESOURCE_EXHAUSTED", "LOGIN_THROTTLED")
    assert 0 < owner.retry_after <= 60
    again = await sign_in(server, transport, email, PASSWORD, attackers[1])
    assert again.reason == "LOGIN_THROTTLED"
    clock.advance(owner.retry_after + 0.5)
    assert await sign_in(server, transport, email, PASSWORD, "198.51.100.7") == Attempt("OK")
    # Every attempt was audited, refused ones included, with the forwarded address.
    assert await login_attempts(server, set(attackers)) == len(attackers) + 2


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_failures_from_one_address_lock_that_address_out_of_the_account(
    clocked: tuple[App, FakeClock], transport: str
) -> None:
    server, clock = clocked
    email = unique_email("target")
    await server.identity.accounts.register(email, PASSWORD, "")
    attacker = f"203.0.113.{uuid.uuid4().int % 250 + 1}"
    for _ in range(3):  # lock_after
        assert await sign_in(server, transport, email, "wrong password!!", attacker) == FAILED
        clock.advance(61)
    locked = await sign_in(server, transport, email, PASSWORD, attacker)
    assert (locked.status, locked.reason) == ("RESOURCE_EXHAUSTED", "LOGIN_LOCKED")
    assert locked.retry_after > 60
    # The owner, elsewhere, signs in; the address stays locked out of the account.
    assert await sign_in(server, transport, email, PASSWORD, "198.51.100.8") == Attempt("OK")
    clock.advance(61)
    still = await sign_in(server, transport, email, PASSWORD, attacker)
    assert still.reason == "LOGIN_LOCKED"
    clock.advance(901)
    assert await sign_in(server, transport, email, PASSWORD, attacker) == Attempt("OK")


async def test_soft_deleted_users_are_purged_after_retention(
    clocked: tuple[App, FakeClock],
) -> None:
    server, clock = clocked
    user = await server.identity.accounts.register(unique_email("purge"), PASSWORD, "")
    deleted = await server.identity.users.delete(user.id, etag="", purge=False)
    assert deleted.purge_time == clock.now() + timedelta(days=30)
    assert await server.identity.users.purge_expired() == 0
    restored = await server.identity.users.undelete(user.id, etag="")
    assert restored.state.value == "active"
    await server.identity.users.delete(user.id, etag="", purge=False)
    clock.advance(timedelta(days=30, seconds=1).total_seconds())
    assert await server.identity.users.purge_expired() >= 1
    async with server.db(readonly=True) as uow:
        assert await uow.users.get(user.id) is None
