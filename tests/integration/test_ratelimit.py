"""Rate limits, quotas, exemptions, violations and load shedding, end to end over gRPC and
the HTTP gateway, on both backends (SQLite with the in-process limiter; PostgreSQL with the
Redis limiter).

The server here trusts loopback as a proxy, so each test picks its own client address
with ``X-Forwarded-For`` and never shares an address bucket with another test. Set-up
calls (register, login) come from an exempt address and are not counted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from tunnelplane.v1 import admin_pb2, auth_pb2, common_pb2, users_pb2

from server.app import App
from server.domain.identity.model import Role, Tier
from server.domain.identity.tiers import DEFAULT_TIERS
from tests.conftest import Backend, started
from tests.helpers import (
    BEHIND_PROXY,
    SETUP,
    Client,
    TestUser,
    client_of,
    eventually,
    fresh_ip,
    http_of,
)

ME = users_pb2.GetUserRequest(name="users/me")
#: Free: one call per 500 ms with three at once; premium: a tiny monthly quota.
TIERS = {
    **DEFAULT_TIERS,
    "free": replace(DEFAULT_TIERS["free"], requests_per_minute=120, burst=3),
    "premium": replace(
        DEFAULT_TIERS["premium"], requests_per_minute=6000, burst=100, requests_per_month=5
    ),
}


@pytest_asyncio.fixture(scope="module")
async def limited(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[App]:
    """A server with small limits and no loopback exemption."""
    settings = backend.settings(
        tmp_path_factory.mktemp("limited"),
        **BEHIND_PROXY,
        rate_exempt_roles="support_admin",
        tiers=TIERS,
        rate_queue_max_wait=0.5,
        rate_queue_limit=20,
        ip_rate_per_minute=600,
        ip_burst=20,
        ip_block_after=6,
        # The measured load stays out of these tests; the adaptive test sets its own.
        load_lag_threshold=60.0,
        load_inflight_threshold=100_000,
        violation_flush_interval=3600.0,
    )
    async with started(settings) as server:
        yield server


@pytest_asyncio.fixture(scope="module")
async def rc(limited: App) -> AsyncIterator[Client]:
    async with client_of(limited, SETUP) as client:
        yield client


@pytest.fixture
def ip() -> str:
    """A client address of this test's own."""
    return fresh_ip()


def as_from(ip: str, user: TestUser | None = None, **extra: str) -> tuple[tuple[str, str], ...]:
    metadata = (("x-forwarded-for", ip), *extra.items())
    return metadata + (user.metadata if user else ())


async def outcome(call: Any) -> tuple[grpc.StatusCode, dict[str, str], Any]:
    """Status, trailing metadata and the error (or None) of a unary grpc.aio call."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code(), dict(error.trailing_metadata() or ()), error
    return grpc.StatusCode.OK, dict(await call.trailing_metadata() or ()), None


def limit_of(metadata: dict[str, str]) -> int:
    """The limit a gRPC response states: ``q`` of its ``ratelimit-policy``."""
    return int(metadata["ratelimit-policy"].split(";q=")[1].split(";")[0])


def details(error: grpc.aio.AioRpcError) -> dict[str, Any]:
    """The ``google.rpc`` details of an error, by type name."""
    raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    assert isinstance(raw, bytes)
    status = status_pb2.Status.FromString(raw)
    found: dict[str, Any] = {}
    for any_ in status.details:
        for kind in (
            error_details_pb2.RetryInfo,
            error_details_pb2.QuotaFailure,
            error_details_pb2.ErrorInfo,
        ):
            if any_.Is(kind.DESCRIPTOR):
                message = kind()
                any_.Unpack(message)
                found[kind.DESCRIPTOR.name] = message
    return found


async def burst(rc: Client, user: TestUser, ip: str, n: int) -> list[tuple[Any, ...]]:
    """``n`` concurrent GetUser calls; their outcomes and latencies in arrival order."""

    async def one() -> tuple[Any, ...]:
        started = time.perf_counter()
        result = await outcome(rc.users.GetUser(ME, metadata=as_from(ip, user)))
        return (*result, time.perf_counter() - started)

    return list(await asyncio.gather(*(one() for _ in range(n))))


# --- headers and refusals ---------------------------------------------------------------


async def test_grpc_limit_metadata_and_refusal_details(rc: Client, ip: str) -> None:
    user = await rc.new_user()
    first = await outcome(rc.users.GetUser(ME, metadata=as_from(ip, user)))
    assert first[0] == grpc.StatusCode.OK
    # Only the IETF pair travels over gRPC; the gateway derives X-RateLimit-* from it.
    assert {k: v for k, v in first[1].items() if "ratelimit" in k} == {
        "ratelimit-policy": '"default";q=120;w=60;burst=3',
        "ratelimit": '"default";r=2;t=1',
    }
    results = await burst(rc, user, ip, 8)
    refused = [r for r in results if r[0] != grpc.StatusCode.OK]
    assert refused, "eight calls at once must exceed three at once and one queued"
    code, trailers, error, _ = refused[0]
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert trailers["ratelimit"].startswith('"default";r=0;')
    assert limit_of(trailers) == 120
    retry_after = int(trailers["retry-after"])
    assert 1 <= retry_after <= 2
    found = details(error)
    delay = found["RetryInfo"].retry_delay
    assert 0 < delay.seconds + delay.nanos / 1e9 <= 2.0
    (violation,) = found["QuotaFailure"].violations
    assert violation.subject == user.name
    assert (violation.quota_id, violation.quota_metric, violation.quota_value) == (
        "RequestsPerMinute",
        "tunnelplane.v1/requests",
        120,
    )
    assert violation.description == "120 requests per minute, burst 3 (free tier)"
    assert found["ErrorInfo"].reason == "RATE_LIMITED"
    assert found["ErrorInfo"].metadata["subject"] == user.name


async def test_http_headers_and_429(limited: App, rc: Client, ip: str) -> None:
    user = await rc.new_user()
    headers = {"authorization": user.metadata[0][1], "x-forwarded-for": ip}
    async with http_of(limited) as http:
        ok = await http.get("/v1/users/me", headers=headers)
        assert ok.status_code == 200
        assert ok.headers["x-ratelimit-limit"] == "120"
        assert ok.headers["x-ratelimit-remaining"] == "2"
        assert ok.headers["x-ratelimit-reset"] == "1"
        assert ok.headers["ratelimit-policy"] == '"default";q=120;w=60;burst=3'
        assert ok.headers["ratelimit"] == '"default";r=2;t=1'
        replies = await asyncio.gather(
            *(http.get("/v1/users/me", headers=headers) for _ in range(8))
        )
    refused = [r for r in replies if r.status_code != 200]
    assert refused
    reply = refused[0]
    assert reply.status_code == 429
    assert 1 <= int(reply.headers["retry-after"]) <= 2
    assert reply.headers["x-ratelimit-remaining"] == "0"
    body = reply.json()
    assert body["code"] == 8
    kinds = {d["@type"].rsplit(".", 1)[1]: d for d in body["details"]}
    assert kinds["QuotaFailure"]["violations"][0]["subject"] == user.name
    assert kinds["QuotaFailure"]["violations"][0]["quotaId"] == "RequestsPerMinute"
    assert kinds["RetryInfo"]["retryDelay"].endswith("s")


async def test_tier_change_takes_effect_at_once(rc: Client, ip: str) -> None:
    user = await rc.new_user()
    admin = await rc.new_user(role=Role.SUPER_ADMIN, tag="admin")
    assert any(r[0] != grpc.StatusCode.OK for r in await burst(rc, user, ip, 8))
    await rc.users.ChangeTier(
        users_pb2.ChangeTierRequest(
            name=user.name, tier=common_pb2.TIER_ENTERPRISE, reason="a test"
        ),
        metadata=SETUP + admin.metadata,
    )
    # The same caller at the same address (its refusals never blocked the address).
    after = await burst(rc, user, ip, 8)
    assert [r[0] for r in after] == [grpc.StatusCode.OK] * 8
    assert limit_of(after[0][1]) == 10000


# --- queueing ---------------------------------------------------------------------------


async def test_slightly_over_the_rate_waits_instead_of_failing(
    limited: App, rc: Client, ip: str
) -> None:
    user = await rc.new_user()
    results = await burst(rc, user, ip, 4)  # three at once, the fourth 500 ms later
    assert [r[0] for r in results] == [grpc.StatusCode.OK] * 4
    latencies = sorted(r[3] for r in results)
    assert latencies[-1] >= 0.3, latencies  # waited for its slot
    assert latencies[0] < 0.3, latencies


async def test_far_over_the_rate_is_refused(rc: Client, ip: str) -> None:
    user = await rc.new_user()
    results = await burst(rc, user, ip, 12)
    codes = [r[0] for r in results]
    assert codes.count(grpc.StatusCode.OK) <= 5  # three at once, at most one or two queued
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 7
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


async def test_the_queue_is_bounded(limited: App, rc: Client, ip: str) -> None:
    stage = limited.limits.stage
    assert stage is not None
    user = await rc.new_user()
    await burst(rc, user, ip, 3)  # spend the burst
    stage.waiting[user.name] = limited.settings.rate_queue_limit  # as if the queue were full
    try:
        code, _, error = await outcome(rc.users.GetUser(ME, metadata=as_from(ip, user)))
    finally:
        del stage.waiting[user.name]
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, "a full queue refuses, it does not wait"
    assert details(error)["ErrorInfo"].reason == "RATE_LIMITED"


async def test_queue_depth_is_visible_to_admins(limited: App, rc: Client, ip: str) -> None:
    user = await rc.new_user()
    admin = await rc.new_user(role=Role.SUPER_ADMIN, tag="admin")
    await burst(rc, user, ip, 3)
    waiting = asyncio.ensure_future(rc.users.GetUser(ME, metadata=as_from(ip, user)))
    stage = limited.limits.stage
    assert stage is not None
    await eventually(lambda: stage.waiting.get(user.name), within=5, every=0.001)
    status = await rc.admin.GetSystemStatus(
        admin_pb2.GetSystemStatusRequest(), metadata=as_from(ip, admin)
    )
    assert status.queued_calls >= 1
    assert (user.name, 1) in [(q.subject, q.waiting) for q in status.queues]
    await waiting


# --- per-address protection -------------------------------------------------------------


async def test_anonymous_callers_are_limited_by_address(rc: Client, ip: str) -> None:
    calls = [
        outcome(rc.users.ListTiers(users_pb2.ListTiersRequest(), metadata=as_from(ip)))
        for _ in range(8)
    ]
    results = await asyncio.gather(*calls)
    refused = [r for r in results if r[0] != grpc.StatusCode.OK]
    assert refused
    (violation,) = details(refused[0][2])["QuotaFailure"].violations
    assert violation.subject == f"ip/{ip}"


async def test_a_persistent_offender_is_blocked_until_an_admin_lifts_it(
    rc: Client, ip: str
) -> None:
    admin = await rc.new_user(role=Role.SUPER_ADMIN, tag="admin")
    as_admin = SETUP + admin.metadata
    tiers = users_pb2.ListTiersRequest()
    # Three at once pass, one waits; six refusals in a minute block the address.
    results = await asyncio.gather(
        *(outcome(rc.users.ListTiers(tiers, metadata=as_from(ip))) for _ in range(12))
    )
    reasons = [details(r[2])["ErrorInfo"].reason for r in results if r[2] is not None]
    assert "RATE_LIMITED" in reasons, reasons
    code, trailers, error = await outcome(rc.users.ListTiers(tiers, metadata=as_from(ip)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details(error)["ErrorInfo"].reason == "IP_BLOCKED"
    assert 800 < int(trailers["retry-after"]) <= 900  # TP_IP_BLOCK_DURATION
    (violation,) = details(error)["QuotaFailure"].violations
    assert (violation.subject, violation.quota_id) == (f"ip/{ip}", "RequestsPerMinutePerAddress")
    # Methods exempt by policy (JWKS, health) stay reachable from a blocked address.
    jwks = auth_pb2.GetJwksRequest()
    assert (await outcome(rc.auth.GetJwks(jwks, metadata=as_from(ip))))[0] == (grpc.StatusCode.OK)

    listed = await rc.admin.ListIpBlocks(admin_pb2.ListIpBlocksRequest(), metadata=as_admin)
    block = next(b for b in listed.ip_blocks if b.ip_address == ip)
    assert block.name == f"ipBlocks/{ip}"
    assert 800 < block.expire_time.ToSeconds() - block.create_time.ToSeconds() <= 900
    await rc.admin.DeleteIpBlock(admin_pb2.DeleteIpBlockRequest(name=block.name), metadata=as_admin)
    listed = await rc.admin.ListIpBlocks(admin_pb2.ListIpBlocksRequest(), metadata=as_admin)
    assert ip not in [b.ip_address for b in listed.ip_blocks]
    missing = await outcome(
        rc.admin.DeleteIpBlock(admin_pb2.DeleteIpBlockRequest(name=block.name), metadata=as_admin)
    )
    assert missing[0] == grpc.StatusCode.NOT_FOUND
    code, _, _ = await outcome(rc.users.ListTiers(tiers, metadata=as_from(ip)))
    assert code == grpc.StatusCode.OK, "lifted: the address is served again"


async def test_a_signed_in_caller_is_held_to_its_own_limit_not_its_address_s(
    rc: Client, ip: str
) -> None:
    """Past the address's limit (20 at once), an enterprise user is served under its own;
    and its calls leave the address's budget to the anonymous callers there."""
    user = await rc.new_user(tier=Tier.ENTERPRISE)
    results = await burst(rc, user, ip, 26)
    assert [r[0] for r in results] == [grpc.StatusCode.OK] * 26
    assert all(limit_of(r[1]) == 10000 for r in results)
    anonymous = await asyncio.gather(
        *(outcome(rc.users.ListTiers(users_pb2.ListTiersRequest(), metadata=as_from(ip)))
          for _ in range(3))
    )  # fmt: skip
    assert [r[0] for r in anonymous] == [grpc.StatusCode.OK] * 3


async def test_a_blocked_address_serves_its_signed_in_callers_and_an_admin_lifts_the_block(
    limited: App, rc: Client, ip: str
) -> None:
    """One noisy address: its anonymous traffic (and bad credentials) is blocked; a user
    there is served under its own limit; an admin there lists and lifts the block, over
    gRPC and over HTTP."""
    user = await rc.new_user()
    admin = await rc.new_user(role=Role.SUPER_ADMIN, tag="admin")
    tiers = users_pb2.ListTiersRequest()
    async with http_of(limited) as http:
        for lift in ("grpc", "http"):
            await _block(rc, ip)
            bad = await outcome(
                rc.users.GetUser(ME, metadata=as_from(ip, authorization="Bearer nope"))
            )
            assert details(bad[2])["ErrorInfo"].reason == "IP_BLOCKED", (
                "bad credentials are anonymous"
            )
            anonymous = await http.get("/v1/tiers", headers={"x-forwarded-for": ip})
            assert anonymous.status_code == 429
            assert "IP_BLOCKED" in anonymous.text
            # A signed-in user at the blocked address: served, under its own limit.
            code, trailers, _ = await outcome(rc.users.GetUser(ME, metadata=as_from(ip, user)))
            assert (code, limit_of(trailers)) == (grpc.StatusCode.OK, 120)
            headers = {"authorization": user.metadata[0][1], "x-forwarded-for": ip}
            assert (await http.get("/v1/users/me", headers=headers)).status_code == 200
            # The administrator, from the blocked address too.
            as_admin = as_from(ip, admin)
            listed = await rc.admin.ListIpBlocks(admin_pb2.ListIpBlocksRequest(), metadata=as_admin)
            assert f"ipBlocks/{ip}" in [b.name for b in listed.ip_blocks]
            if lift == "grpc":
                await rc.admin.DeleteIpBlock(
                    admin_pb2.DeleteIpBlockRequest(name=f"ipBlocks/{ip}"), metadata=as_admin
                )
            else:
                admin_headers = {"authorization": admin.metadata[0][1], "x-forwarded-for": ip}
                listed_http = await http.get("/v1/ipBlocks", headers=admin_headers)
                assert listed_http.status_code == 200
                assert ip in [b["ipAddress"] for b in listed_http.json()["ipBlocks"]]
                lifted = await http.delete(f"/v1/ipBlocks/{ip}", headers=admin_headers)
                assert lifted.status_code == 200, lifted.text
            code, _, _ = await outcome(rc.users.ListTiers(tiers, metadata=as_from(ip)))
            assert code == grpc.StatusCode.OK, f"lifted over {lift}: anonymous calls served again"
    # The user's own limit still holds it (free: three at once), without blocking anyone.
    results = await burst(rc, user, ip, 8)
    reasons = {details(r[2])["ErrorInfo"].reason for r in results if r[2] is not None}
    assert reasons == {"RATE_LIMITED"}
    code, _, _ = await outcome(rc.users.ListTiers(tiers, metadata=as_from(ip)))
    assert code == grpc.StatusCode.OK, "a signed-in caller's refusals never block its address"


async def _block(rc: Client, ip: str) -> None:
    """Anonymous calls from ``ip`` until it is blocked (six refusals here)."""
    tiers = users_pb2.ListTiersRequest()
    results = await asyncio.gather(
        *(outcome(rc.users.ListTiers(tiers, metadata=as_from(ip))) for _ in range(12))
    )
    assert any(r[2] is not None for r in results)
    code, _, error = await outcome(rc.users.ListTiers(tiers, metadata=as_from(ip)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details(error)["ErrorInfo"].reason == "IP_BLOCKED"


# --- quotas -----------------------------------------------------------------------------


async def test_monthly_quota_counts_once_per_request_id_and_refuses_past_it(
    rc: Client, ip: str
) -> None:
    user = await rc.new_user(tier=Tier.PREMIUM)  # five requests a month here
    for n in range(4):
        await rc.users.GetUser(ME, metadata=as_from(ip, user, **{"x-request-id": f"q-{n}"}))
    # A retry with the same request id is not a new request.
    await rc.users.GetUser(ME, metadata=as_from(ip, user, **{"x-request-id": "q-3"}))
    usage_request = users_pb2.GetUsageRequest(name="users/me/usage")
    usage = await rc.users.GetUsage(usage_request, metadata=as_from(ip, user))
    quotas = {q.metric: (q.used, q.limit) for q in usage.quotas}
    assert quotas["requests"] == (4, 5)
    assert usage.tier == common_pb2.TIER_PREMIUM
    assert usage.period_end.ToSeconds() > usage.period_start.ToSeconds()
    await rc.users.GetUser(ME, metadata=as_from(ip, user))
    code, _, error = await outcome(rc.users.GetUser(ME, metadata=as_from(ip, user)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    found = details(error)
    assert found["ErrorInfo"].reason == "QUOTA_EXCEEDED"
    (violation,) = found["QuotaFailure"].violations
    assert (violation.quota_id, violation.quota_value, violation.subject) == (
        "RequestsPerMonth",
        5,
        user.name,
    )
    # Reading one's usage still works once the quota is spent, and shows it spent.
    usage = await rc.users.GetUsage(usage_request, metadata=as_from(ip, user))
    assert {q.metric: (q.used, q.limit) for q in usage.quotas}["requests"] == (5, 5)


# --- exemptions -------------------------------------------------------------------------


async def test_exempt_role_is_never_limited_but_would_be_refusals_are_logged(
    limited: App, rc: Client, ip: str, caplog: pytest.LogCaptureFixture
) -> None:
    support = await rc.new_user(role=Role.SUPPORT_ADMIN, tag="support")
    counter = limited.limits.metrics.decisions.labels("subject", "exempt_would_refuse")
    before = counter._value.get()
    with caplog.at_level("INFO", logger="tunnelplane.ratelimit"):
        results = await burst(rc, support, ip, 10)
    assert [r[0] for r in results] == [grpc.StatusCode.OK] * 10
    # Counted like anyone's calls: past three at once, each would have been refused.
    would = counter._value.get() - before
    assert would >= 6
    logged = [r for r in caplog.records if r.getMessage().startswith("exempt call would")]
    assert len(logged) == would
    assert {(r.subject, r.client_ip, r.policy) for r in logged} == {  # type: ignore[attr-defined]
        (support.name, ip, "subject")
    }
    assert all(limit_of(r[1]) == 120 for r in results)
    # Answered, not refused: no Retry-After on any of them, over the limit or not.
    assert all("retry-after" not in r[1] for r in results)


async def test_exempt_method_is_never_limited(rc: Client, ip: str) -> None:
    jwks = auth_pb2.GetJwksRequest()
    results = await asyncio.gather(
        *(outcome(rc.auth.GetJwks(jwks, metadata=as_from(ip))) for _ in range(10))
    )
    assert [r[0] for r in results] == [grpc.StatusCode.OK] * 10


# --- violations -------------------------------------------------------------------------


async def test_refusals_are_recorded_and_summarised(limited: App, rc: Client, ip: str) -> None:
    user = await rc.new_user()
    admin = await rc.new_user(role=Role.SUPER_ADMIN, tag="admin")
    results = await burst(rc, user, ip, 10)
    reasons = [details(r[2])["ErrorInfo"].reason for r in results if r[2] is not None]
    refused = reasons.count("RATE_LIMITED")
    assert refused == len(reasons), "a signed-in caller is never blocked with its address"
    await limited.limits.violations.flush()
    metadata = SETUP + admin.metadata
    listed = await rc.admin.ListRateLimitViolations(
        admin_pb2.ListRateLimitViolationsRequest(
            filter=f'subject = "{user.name}" AND policy = "subject"'
        ),
        metadata=metadata,
    )
    assert sum(v.count for v in listed.violations) == refused
    (row,) = listed.violations
    assert (row.ip_address, row.method, row.policy) == (
        ip,
        "/tunnelplane.v1.UserService/GetUser",
        "subject",
    )
    summary = await rc.admin.SummarizeRateLimitViolations(
        admin_pb2.SummarizeRateLimitViolationsRequest(window=duration_pb2.Duration(seconds=600)),
        metadata=metadata,
    )
    assert summary.total >= refused
    assert user.name in [c.key for c in summary.top_subjects]
    assert "/tunnelplane.v1.UserService/GetUser" in [c.key for c in summary.top_methods]


# --- load shedding ----------------------------------------------------------------------


async def test_overload_tightens_limits_and_sheds_the_lowest_tier_first(
    limited: App, rc: Client, ip: str
) -> None:
    free = await rc.new_user()
    premium_ip = ip.rsplit(".", 1)[0] + ".8"
    enterprise = await rc.new_user(tier=Tier.ENTERPRISE)
    admin = await rc.new_user(role=Role.SUPER_ADMIN, tag="admin")
    load = limited.limits.load
    load.synthetic = lambda: 0.85  # free sheds from 0.8, premium from 0.9
    try:
        code, _, error = await outcome(rc.users.GetUser(ME, metadata=as_from(ip, free)))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert details(error)["RetryInfo"].retry_delay.seconds == 1
        headers = {"authorization": free.metadata[0][1], "x-forwarded-for": ip}
        async with http_of(limited) as http:
            shed = await http.get("/v1/users/me", headers=headers)
        assert (shed.status_code, shed.headers["retry-after"]) == (503, "1")
        # Critical work still passes for the same caller.
        refresh = auth_pb2.RefreshTokenRequest(refresh_token=free.refresh_token)
        await rc.auth.RefreshToken(refresh, metadata=as_from(ip))
        # A higher tier is served, with a tightened limit.
        code, trailers, _ = await outcome(
            rc.users.GetUser(ME, metadata=as_from(premium_ip, enterprise))
        )
        assert code == grpc.StatusCode.OK
        assert limit_of(trailers) == 10000  # enterprise tightens from 0.85 on
        status = await rc.admin.GetSystemStatus(
            admin_pb2.GetSystemStatusRequest(), metadata=SETUP + admin.metadata
        )
        assert status.load.shedding
        assert status.load.tier_factors["free"] < status.load.tier_factors["premium"] < 1
        gauge = limited.registry.get_sample_value(
            "tunnelplane_adaptive_limit_factor", {"tier": "free"}
        )
        assert gauge == pytest.approx(status.load.tier_factors["free"], abs=1e-3)
    finally:
        load.synthetic = None
    code, trailers, _ = await outcome(rc.users.GetUser(ME, metadata=as_from(ip, free)))
    assert code == grpc.StatusCode.OK, "limits relax when the load falls"
    assert limit_of(trailers) == 120


async def test_the_configured_backend_made_every_decision(limited: App, backend: Backend) -> None:
    """Runs last here: no decision fell back or failed during the tests above."""
    assert limited.limits.limiter.backend == ("redis" if backend.redis_url else "memory")
    registry = limited.registry
    assert registry.get_sample_value("tunnelplane_ratelimit_errors_total") == 0
    for to in ("redis", "memory"):
        switches = registry.get_sample_value(
            "tunnelplane_ratelimit_backend_switches_total", {"to": to}
        )
        assert not switches, f"switched to {to}"
    refused = registry.get_sample_value(
        "tunnelplane_ratelimit_decisions_total", {"policy": "subject", "result": "refused"}
    )
    assert refused
