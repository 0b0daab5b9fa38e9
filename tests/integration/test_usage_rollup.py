"""Monthly request usage outlives the limiter's state: it is rolled up to the database, and
a limiter that lost its counters (Redis restarted or evicted them; the in-process limiter's
process restarted) resumes from the persisted figure. Roll-ups are idempotent: replicas
rolling up at once, or one rolling up twice, never count anything twice.

On both backends: PostgreSQL with the Redis limiter (its counters deleted under a running
server), and SQLite with the in-process limiter (the server restarted).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, date, datetime
from pathlib import Path

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tunnelplane.v1 import users_pb2

from server.app import App
from server.domain.common.clock import SystemClock
from server.domain.common.errors import Unavailable
from server.domain.common.ids import new_id
from server.domain.identity.model import Preferences, Role, Tier, User, UserState
from server.domain.identity.tiers import DEFAULT_TIERS
from server.domain.limits.model import Decision, Outcome
from server.domain.limits.rules import quota_key
from server.domain.limits.service import RequestUsage
from server.settings import Settings
from server.storage.database import Database
from server.storage.kv import redis_client
from server.storage.limiter import MemoryLimiter
from tests.conftest import REDIS_URL, Backend, migrate, redis_prefix, started
from tests.helpers import BEHIND_PROXY, SETUP, Client, TestUser, fails, http_of, reason

ME = users_pb2.GetUserRequest(name="users/me")
USAGE = users_pb2.GetUsageRequest(name="users/me/usage")
QUOTA = 8
TIERS = {
    **DEFAULT_TIERS,
    "premium": replace(DEFAULT_TIERS["premium"], requests_per_month=QUOTA),
}


class Caller:
    """One user calling one server over gRPC and HTTP from its own address."""

    def __init__(
        self, server: App, channel: grpc.aio.Channel, http: httpx.AsyncClient, user: TestUser
    ) -> None:
        self.client = Client(server, channel, setup_metadata=SETUP)
        self.http = http
        self.metadata = (("x-forwarded-for", "10.77.0.1"), *user.metadata)
        self.headers = {"authorization": user.metadata[0][1], "x-forwarded-for": "10.77.0.1"}

    async def get_user(self) -> users_pb2.User:
        return await self.client.users.GetUser(ME, metadata=self.metadata)

    async def requests_used(self) -> int:
        """What GetUsage reports over gRPC, checked against what it reports over HTTP."""
        usage = await self.client.users.GetUsage(USAGE, metadata=self.metadata)
        used = {q.metric: q.used for q in usage.quotas}["requests"]
        reply = await self.http.get("/v1/users/me/usage", headers=self.headers)
        assert reply.status_code == 200, reply.text
        assert {q["metric"]: int(q["used"]) for q in reply.json()["quotas"]}["requests"] == used
        return used


@contextlib.asynccontextmanager
async def serving(
    settings_: Settings,
) -> AsyncIterator[tuple[App, grpc.aio.Channel, httpx.AsyncClient]]:
    """A started server, a channel to it and an HTTP client of its gateway."""
    async with (
        started(settings_) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
        http_of(server) as http,
    ):
        yield server, channel, http


async def test_usage_and_quota_resume_from_the_roll_up_when_the_limiter_loses_its_counters(
    backend: Backend, tmp_path: Path
) -> None:
    settings_ = backend.settings(
        tmp_path,
        **BEHIND_PROXY,
        tiers=TIERS,
        usage_flush_interval=3600.0,  # rolled up when this test says so
        redis_prefix=redis_prefix(),  # its counters are deleted below: only this test's
    )
    async with serving(settings_) as (first, channel, http):
        setup = Client(first, channel, setup_metadata=SETUP)
        user = await setup.new_user(tier=Tier.PREMIUM)
        caller = Caller(first, channel, http, user)
        for _ in range(5):
            await caller.get_user()
        assert await caller.requests_used() == 5
        assert await _persisted(first, user) == 0, "calls write nothing: the roll-up does"
        assert await first.limits.usage_rollup.flush() == 1
        assert await _persisted(first, user) == 5
        assert first.registry.get_sample_value("tunnelplane_usage_rollup_rows_total") == 1
        if backend.redis_url:
            await _lose_redis_counters(settings_.redis_prefix)
            await _resume(caller)
            return
    # The in-process limiter's state goes with its process.
    async with serving(settings_) as (second, channel, http):
        await _resume(Caller(second, channel, http, user))


async def _persisted(server: App, user: TestUser) -> int:
    month = datetime.now(UTC).date().replace(day=1)
    async with server.db(readonly=True) as uow:
        return await uow.request_usage.get(user.id, month)


async def _lose_redis_counters(prefix: str) -> None:
    """What a Redis restart or an eviction does to the server's quota counters."""
    redis = redis_client(REDIS_URL)
    try:
        keys = [key async for key in redis.scan_iter(match=f"{prefix}quota:*")]
        assert keys, f"no quota counter under {prefix}"
        await redis.delete(*keys)
    finally:
        await redis.aclose()


async def _resume(caller: Caller) -> None:
    """The limiter lost the counter of a user who made 5 of their 8 calls (persisted)."""
    assert await caller.requests_used() == 5, "the persisted figure, before any new call"
    for _ in range(3):
        await caller.get_user()
    # The first of them made the counter again, and started adding the persisted figure.
    await caller.client.app.limits.usage.settled()
    assert await caller.requests_used() == QUOTA
    error = await fails(caller.get_user(), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert reason(error) == "QUOTA_EXCEEDED"
    reply = await caller.http.get("/v1/users/me", headers=caller.headers)
    assert reply.status_code == 429
    assert "QUOTA_EXCEEDED" in reply.text
    assert await caller.requests_used() == QUOTA


# --- roll-ups are idempotent ------------------------------------------------------------

_months = itertools.count()
_users: dict[str, list[str]] = {}


async def _add_users(db: Database, ids: list[str]) -> None:
    now = datetime.now(UTC)
    async with db() as uow:
        for user_id in ids:
            user = User(
                user_id, f"{user_id}@example.com", "roll-up", Role.USER, Tier.FREE,
                UserState.ACTIVE, Preferences(), now, now,
            )  # fmt: skip
            await uow.users.add(user, None)


async def _users_of(db: Database, url: str) -> list[str]:
    """Three users of this test in the database at ``url`` (made once per database)."""
    if url not in _users:
        ids = [new_id("usr") for _ in range(3)]
        await _add_users(db, ids)
        _users[url] = ids
    return _users[url]


def _noted(usage: RequestUsage, key: str, used: int) -> None:
    usage.counted(key, Decision(Outcome.ALLOWED, quota_used=used))


notes = st.lists(
    st.tuples(st.integers(0, 1), st.integers(0, 2), st.integers(1, 10**9)), min_size=1, max_size=30
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(notes=notes, rounds=st.integers(1, 3))
def test_replicas_rolling_up_at_once_never_count_twice(
    backend: Backend, notes: list[tuple[int, int, int]], rounds: int
) -> None:
    """Two replicas (each its own engine) note counters' values, some the same counter at
    the same value, and roll up at the same moment, twice each round: what is persisted is
    the highest value any of them saw, never a sum."""

    async def run() -> None:
        n = next(_months)
        month = date(1900 + n // 12, n % 12 + 1, 1)
        tag = f"{month:%Y%m}"
        clock = SystemClock()
        dbs = [Database(backend.database_url, clock=clock, pool_size=2) for _ in range(2)]
        log = logging.getLogger("tests.usage")
        replicas = [RequestUsage(db, MemoryLimiter(), clock, log) for db in dbs]
        try:
            users = await _users_of(dbs[0], backend.database_url)
            highest: dict[str, int] = {}
            per_round = max(1, -(-len(notes) // rounds))
            for start in range(0, len(notes), per_round):
                for replica, user, used in notes[start : start + per_round]:
                    _noted(replicas[replica], quota_key(users[user], "requests", tag), used)
                    # The other replica saw the same counter at the same value, too.
                    if used % 3 == 0:
                        _noted(replicas[1 - replica], quota_key(users[user], "requests", tag), used)
                    highest[users[user]] = max(highest.get(users[user], 0), used)
                await asyncio.gather(*(r.flush() for r in replicas), *(r.flush() for r in replicas))
                assert all(r.pending == 0 for r in replicas)
            async with dbs[0](readonly=True) as uow:
                persisted = {u: await uow.request_usage.get(u, month) for u in users}
            assert persisted == {u: highest.get(u, 0) for u in users}
        finally:
            for db in dbs:
                await db.dispose()

    asyncio.run(run())


async def test_a_failed_roll_up_keeps_its_figures_for_the_next(tmp_path: Path) -> None:
    """The first roll-up meets a database without the table (not migrated yet) and fails;
    the figures stay noted, and the next roll-up writes them."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'late.db'}"
    clock = SystemClock()
    db = Database(url, clock=clock, pool_size=1)
    try:
        usage = RequestUsage(db, MemoryLimiter(), clock, logging.getLogger("tests.usage"))
        user_id = new_id("usr")
        _noted(usage, quota_key(user_id, "requests", "189912"), 7)
        with pytest.raises(Unavailable):
            await usage.flush()
        assert usage.pending == 1, "kept for the next roll-up"
        await migrate(url)
        _users[url] = [user_id]
        await _add_users(db, [user_id])
        _noted(usage, quota_key(user_id, "requests", "189912"), 9)
        assert await usage.flush() == 1
        async with db(readonly=True) as uow:
            assert await uow.request_usage.get(user_id, date(1899, 12, 1)) == 9
    finally:
        await db.dispose()
