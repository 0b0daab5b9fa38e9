"""The control-plane session against a test-double AgentService over real loopback gRPC."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import platform
import socket
from collections.abc import Callable

import grpc
import pytest
from tunnelplane.v1 import agents_pb2

from agent import __version__
from agent.backoff import BackoffPolicy
from agent.session import Session, SessionSettings
from tests.agent.fakes import (
    DesiredState,
    EchoServer,
    FakeControlPlane,
    closed_by_peer,
    connect,
    desired,
    next_item,
    round_trip,
    running,
)
from tests.certs import self_signed_pem

KEY = "tpk_agent_0123456789abcdef"
TUNNEL = "users/u1/tunnels/t1"
Reports = list[agents_pb2.AgentReport]


def settings_for(plane: FakeControlPlane, **overrides: object) -> SessionSettings:
    """Fast settings: short intervals and back-off."""
    base = SessionSettings(
        control_plane=plane.address,
        tunnel=TUNNEL,
        agent_id="agent-1",
        key=KEY,
        heartbeat_interval=0.05,
        report_interval=0.02,
        quiet_reports=3,
        backoff=BackoffPolicy(initial=0.01, cap=0.1, reset_after=30),
    )
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


async def reports_until(plane: FakeControlPlane, done: Callable[[Reports], bool]) -> Reports:
    """Reports the plane receives, until ``done`` says there are enough."""
    reports: Reports = []
    while not done(reports):
        reports.append(await next_item(plane.reports))
    return reports


def total(reports: Reports, field: str) -> int:
    return sum(getattr(report, field) for report in reports)


async def test_hello_welcome_and_the_key_in_metadata(plane: FakeControlPlane) -> None:
    async with running(Session(settings_for(plane))) as session:
        metadata = await next_item(plane.metadata)
        hello = await next_item(plane.hellos)
        await session.wait_connected()
        heartbeat = await next_item(plane.heartbeats)

    assert metadata["authorization"] == f"Bearer {KEY}"
    assert (hello.tunnel, hello.agent_id, hello.version) == (TUNNEL, "agent-1", __version__)
    assert (hello.hostname, hello.os) == (socket.gethostname(), platform.platform())
    assert heartbeat.active_connections == 0


async def test_started_state_relays_and_reports_count_the_traffic(
    plane: FakeControlPlane, echo: EchoServer
) -> None:
    plane.push(desired(1, target=echo.address))
    payload = b"x" * 1000
    async with running(Session(settings_for(plane))) as session:
        await session.wait_applied(1)
        relay = session.controller.relay
        assert relay is not None
        async with connect(relay.port) as client:
            assert await round_trip(*client, payload) == payload
        await relay.wait_until_idle()
        reports = await reports_until(plane, lambda rs: total(rs, "success_count") == 1)

    assert [r.sequence for r in reports] == list(range(1, len(reports) + 1))
    assert total(reports, "bytes_in") == total(reports, "bytes_out") == 1000
    assert total(reports, "connections") == total(reports, "request_count") == 1
    assert total(reports, "error_count") == 0
    assert sum(sum(r.latency_buckets) for r in reports) == 1
    assert {len(r.latency_buckets) for r in reports} == {14}
    assert max(r.peak_concurrency for r in reports) == 1
    assert reports[-1].active_connections == 0
    assert all(r.HasField("time") for r in reports)
    assert echo.accepted == 1


async def test_stopped_state_closes_the_relay(plane: FakeControlPlane, echo: EchoServer) -> None:
    plane.push(desired(1, target=echo.address))
    async with running(Session(settings_for(plane))) as session:
        await session.wait_applied(1)
        relay = session.controller.relay
        assert relay is not None
        port = relay.port
        async with connect(port) as (reader, writer):
            await round_trip(reader, writer, b"hi")
            plane.push(desired(2, DesiredState.RUN_STOPPED, stop_grace=0))
            await session.wait_applied(2)
            assert session.controller.relay is None
            assert await closed_by_peer(reader)
        with pytest.raises(ConnectionRefusedError):
            async with connect(port):
                pass


async def test_unacknowledged_reports_are_resent_after_the_control_plane_restarts(
    echo: EchoServer,
) -> None:
    state = desired(1, target=echo.address)
    first = await FakeControlPlane(ack=False, desired_state=state).start()
    session = Session(settings_for(first, quiet_reports=1))
    async with running(session):
        await session.wait_applied(1)
        relay = session.controller.relay
        assert relay is not None
        async with connect(relay.port) as client:
            await round_trip(*client, b"before")
            seen = await reports_until(
                first, lambda rs: len(rs) >= 3 and total(rs, "bytes_in") == 6
            )
            await first.stop()
            while not first.reports.empty():
                seen.append(first.reports.get_nowait())
            # The control plane is down: traffic still flows through the open connection.
            assert await round_trip(*client, b"after") == b"after"

            second = await FakeControlPlane(last_sequence=1, desired_state=state).start(first.port)
            try:
                await next_item(second.hellos)
                by_sequence = {r.sequence: r for r in seen}
                after = await reports_until(
                    second,
                    lambda rs: rs and total(rs, "bytes_in") + 6 == 11 and _contiguous(rs),
                )
            finally:
                await second.stop()
        assert session.controller.relay is relay

    assert after[0].sequence == 2  # 1 was counted (welcome.last_sequence), not resent
    resent = [r for r in after if r.sequence in by_sequence]
    assert resent == [by_sequence[r.sequence] for r in resent]
    assert [r.sequence for r in resent] == sorted(s for s in by_sequence if s > 1)
    assert {r.sequence for r in after} <= second.counted


async def test_a_refused_report_is_dropped_and_never_sent_again(
    plane: FakeControlPlane, echo: EchoServer
) -> None:
    plane.push(desired(1, target=echo.address))
    plane.refuse_reports = {1}
    session = Session(settings_for(plane, quiet_reports=1))
    async with running(session):
        await session.wait_applied(1)
        assert (await next_item(plane.reports)).sequence == 1
        while session.reports.refused == 0:  # a report every interval: wait for the ack
            await next_item(plane.reports)
        plane.go_away()  # a new stream: whatever is unacknowledged is sent again
        await next_item(plane.hellos)
        await next_item(plane.hellos)
        after = await reports_until(plane, lambda rs: len(rs) >= 3)
    assert session.reports.refused == 1
    assert 1 not in {r.sequence for r in after}
    assert 1 not in {r.sequence for r in session.reports.pending}


async def test_go_away_reconnects_within_the_time_asked_and_the_relay_carries_on(
    plane: FakeControlPlane, echo: EchoServer
) -> None:
    plane.push(desired(1, target=echo.address))
    slow_backoff = BackoffPolicy(initial=60, cap=60)  # what a failure would wait, at most
    session = Session(settings_for(plane, backoff=slow_backoff))
    loop = asyncio.get_running_loop()
    async with running(session):
        await session.wait_applied(1)
        relay = session.controller.relay
        assert relay is not None
        await next_item(plane.hellos)
        async with connect(relay.port) as client:
            assert await round_trip(*client, b"before") == b"before"
            told = loop.time()
            plane.go_away(reconnect_within=0.2)
            await next_item(plane.hellos)
            reconnected = loop.time() - told
            await session.wait_connected()
            assert await round_trip(*client, b"after") == b"after"
        assert session.controller.relay is relay
    assert session.welcomes == 2
    assert reconnected < 5


def _contiguous(reports: Reports) -> bool:
    sequences = [r.sequence for r in reports]
    return sequences == list(range(sequences[0], sequences[0] + len(sequences)))


@pytest.mark.parametrize(
    ("code", "at_cap"),
    [(grpc.StatusCode.UNAUTHENTICATED, True), (grpc.StatusCode.UNAVAILABLE, False)],
)
async def test_refusals_that_retrying_cannot_fix_back_off_at_the_cap(
    code: grpc.StatusCode, at_cap: bool, caplog: pytest.LogCaptureFixture
) -> None:
    plane = await FakeControlPlane(refuse=code).start()
    backoff = BackoffPolicy(initial=0.001, cap=0.5)
    loop = asyncio.get_running_loop()
    try:
        async with running(Session(settings_for(plane, backoff=backoff))):
            await next_item(plane.metadata)
            started = loop.time()
            await next_item(plane.metadata)
            waited = loop.time() - started
    finally:
        await plane.stop()

    assert (waited >= 0.5) is at_cap
    level = logging.ERROR if at_cap else logging.WARNING
    logged = [r for r in caplog.records if r.levelno == level and getattr(r, "code", "")]
    assert logged
    assert logged[0].code == code.name  # type: ignore[attr-defined]
    assert all(KEY not in str(vars(record)) for record in caplog.records)


async def test_a_control_plane_that_never_welcomes_is_left_and_retried() -> None:
    plane = await FakeControlPlane(welcome=False).start()
    try:
        async with running(Session(settings_for(plane, handshake_timeout=0.1))):
            first = await next_item(plane.hellos)
            again = await next_item(plane.hellos)
    finally:
        await plane.stop()
    assert first == again


async def test_stop_while_reconnecting_returns_at_once_and_closes_the_relay(
    echo: EchoServer,
) -> None:
    plane = await FakeControlPlane(desired_state=desired(1, target=echo.address)).start()
    session = Session(settings_for(plane, backoff=BackoffPolicy(initial=60, cap=60)))
    task = asyncio.create_task(session.run())
    await session.wait_applied(1)
    relay = session.controller.relay
    assert relay is not None
    port = relay.port
    await plane.stop()
    session.stop()
    async with asyncio.timeout(5):
        await task
    assert session.controller.relay is None
    with pytest.raises(ConnectionRefusedError):
        async with connect(port):
            pass


async def test_tls_with_the_given_roots() -> None:
    cert, key = self_signed_pem()
    credentials = grpc.ssl_server_credentials([(key, cert)])
    plane = await FakeControlPlane().start(credentials=credentials)
    settings = settings_for(plane, tls=True, root_certificates=cert)
    try:
        async with running(Session(settings)) as session:
            await session.wait_connected()
            assert (await next_item(plane.metadata))["authorization"] == f"Bearer {KEY}"
    finally:
        await plane.stop()
