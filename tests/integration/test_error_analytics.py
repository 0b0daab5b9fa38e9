"""Error analytics: every call's outcome counted per minute in the database, summarized
over a window beside the window before it.

- A property over both databases: for any generated calls spread over two windows, the
  summary's calls, errors, categories and top failures are exactly what was recorded.
- End to end over gRPC and HTTP: failing calls to a real server show up in
  ``SummarizeErrors`` by method, code, reason and category.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tunnelplane.v1 import admin_pb2, users_pb2

from server.domain.analytics.rules import category_of
from server.domain.analytics.service import CallOutcomes
from server.domain.identity.model import Role
from server.storage.database import Database
from tests.conftest import Backend, own_database, sqlite_server
from tests.helpers import client_of, fails, http_of
from tests.integration.test_webhook_dispatch import ManualClock

WINDOW = timedelta(minutes=30)
METHODS = ["/tunnelplane.v1.UserService/GetUser", "/tunnelplane.v1.TunnelService/ListTunnels"]
FAILURES = [
    ("NOT_FOUND", "NOT_FOUND"),
    ("UNAUTHENTICATED", "TOKEN_INVALID"),
    ("RESOURCE_EXHAUSTED", "RATE_LIMITED"),
    ("UNAVAILABLE", "UNAVAILABLE"),
    ("INTERNAL", "INTERNAL"),
]
calls = st.lists(
    st.tuples(
        st.sampled_from(METHODS),
        st.one_of(st.none(), st.sampled_from(FAILURES)),  # None: succeeded
        st.booleans(),  # in the window (True) or the one before
        st.integers(0, 29),  # minute within its window
    ),
    max_size=60,
)


@pytest.fixture(scope="module")
async def database(
    backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    async with own_database(backend, tmp_path_factory.mktemp("analytics")) as own:
        yield own.database_url


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(generated=calls)
def test_the_summary_is_what_was_recorded(
    database: str, generated: list[tuple[str, tuple[str, str] | None, bool, int]]
) -> None:
    asyncio.run(_check(database, generated))


async def _check(url: str, generated: list[tuple[str, tuple[str, str] | None, bool, int]]) -> None:
    clock = ManualClock()
    # Far from any other example's minutes: each example sees only its own rows.
    clock.set(datetime(2030, 1, 1, tzinfo=UTC) + timedelta(days=len(generated)))
    end = clock.now() + 2 * WINDOW
    db = Database(url, clock=clock, pool_size=2)
    outcomes = CallOutcomes(db, clock)
    try:
        async with db() as uow:
            await uow.call_outcomes.delete_before(datetime(2100, 1, 1, tzinfo=UTC))
        for method, failure, recent, minute in sorted(generated, key=lambda g: (g[2], g[3])):
            window_start = end - (WINDOW if recent else 2 * WINDOW)
            clock.set(window_start + timedelta(minutes=minute, seconds=1))
            if failure is None:
                outcomes.succeeded(method)
            else:
                outcomes.failed(method, *failure)
            await outcomes.flush()
        clock.set(end)
        summary = await outcomes.summarize(WINDOW, 100)
    finally:
        await db.dispose()
    now = [g for g in generated if g[2]]
    then = [g for g in generated if not g[2]]
    assert (summary.calls.count, summary.calls.previous) == (len(now), len(then))
    failed_now = [g for g in now if g[1] is not None]
    failed_then = [g for g in then if g[1] is not None]
    assert (summary.errors.count, summary.errors.previous) == (len(failed_now), len(failed_then))
    for category, tally in summary.by_category.items():
        assert tally.count == sum(1 for g in failed_now if category_of(g[1][0]) is category)  # type: ignore[index]
        assert tally.previous == sum(1 for g in failed_then if category_of(g[1][0]) is category)  # type: ignore[index]
    expected = Counter((g[0], *g[1]) for g in failed_now)  # type: ignore[misc]
    assert {(e.method, e.code, e.reason): e.tally.count for e in summary.top} == dict(expected)
    counts = [e.tally.count for e in summary.top]
    assert counts == sorted(counts, reverse=True)


async def test_failing_calls_show_in_the_summary_over_grpc_and_http(tmp_path: Path) -> None:
    async with sqlite_server(tmp_path) as app, client_of(app) as client:
        admin = await client.new_user(role=Role.SUPER_ADMIN, tag="admin")
        user = await client.new_user()
        for _ in range(3):
            await fails(
                client.users.GetUser(
                    users_pb2.GetUserRequest(name="users/usr_01jd3k0000000000000000000a"),
                    metadata=admin.metadata,
                ),
                grpc.StatusCode.NOT_FOUND,
            )
        await fails(
            client.users.GetUser(users_pb2.GetUserRequest(name="users/me")),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        await client.users.GetUser(
            users_pb2.GetUserRequest(name="users/me"), metadata=user.metadata
        )
        await app.api.outcomes.flush()

        summary = await client.admin.SummarizeErrors(
            admin_pb2.SummarizeErrorsRequest(window=duration_pb2.Duration(seconds=600), top=5),
            metadata=admin.metadata,
        )
        get_user = "/tunnelplane.v1.UserService/GetUser"
        top = {(e.method, e.code, e.reason, e.category): e.count.count for e in summary.top_errors}
        assert top[(get_user, "NOT_FOUND", "NOT_FOUND", "client")] == 3
        assert top[(get_user, "UNAUTHENTICATED", "CREDENTIALS_MISSING", "auth")] == 1
        assert summary.errors.count >= 4
        assert summary.calls.count > summary.errors.count  # the sign-ups and sign-ins
        assert summary.by_category["client"].count == 3
        assert summary.by_category["auth"].count >= 1
        assert 0 < summary.error_rate < 1
        assert not summary.errors.HasField("change")  # nothing in the window before

        async with http_of(app) as http:
            auth = {"authorization": admin.metadata[0][1]}
            body = (await http.get("/v1/errors:summarize?window=600s&top=1", headers=auth)).json()
            assert body["topErrors"][0]["reason"] == "NOT_FOUND"
            assert body["topErrors"][0]["count"]["count"] == "3"
            assert body["byCategory"]["client"]["count"] == "3"
            bad = await http.get("/v1/errors:summarize?window=30s", headers=auth)
            assert bad.status_code == 400
