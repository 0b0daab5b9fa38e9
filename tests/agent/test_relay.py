"""The TCP relay against real local echo services."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from agent.counters import BUCKET_COUNT, Counters
from agent.relay import Relay, parse_address
from tests.agent.fakes import EchoServer, closed_by_peer, connect, round_trip, unused_port


@pytest_asyncio.fixture
async def relay(echo: EchoServer, counters: Counters) -> AsyncIterator[Relay]:
    """A relay on a free port in front of the echo service."""
    running = Relay("127.0.0.1", 0, echo.address, counters)
    await running.start()
    yield running
    await running.stop()


async def test_bytes_round_trip_and_counters_are_exact(relay: Relay, counters: Counters) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB: several chunks, with back-pressure
    async with connect(relay.port) as (reader, writer):
        assert await round_trip(reader, writer, b"hello") == b"hello"
        assert await round_trip(reader, writer, payload) == payload
    await relay.wait_until_idle()

    snapshot = counters.take()
    assert snapshot.connections == 1
    assert snapshot.bytes_in == 5 + len(payload)
    assert snapshot.bytes_out == 5 + len(payload)
    assert (snapshot.successes, snapshot.errors, snapshot.requests) == (1, 0, 1)
    assert (snapshot.active, snapshot.peak) == (0, 1)
    assert len(snapshot.latency_buckets) == BUCKET_COUNT
    assert sum(snapshot.latency_buckets) == 1


async def test_take_starts_a_new_interval(relay: Relay, counters: Counters) -> None:
    async with connect(relay.port) as (reader, writer):
        await round_trip(reader, writer, b"x")
        first = counters.take()
        second = counters.take()
    await relay.wait_until_idle()
    third = counters.take()

    assert (first.connections, first.bytes_in, first.peak, first.active) == (1, 1, 1, 1)
    assert (second.connections, second.bytes_in, second.peak, second.active) == (0, 0, 1, 1)
    assert not second.has_traffic()
    assert (third.successes, third.peak, third.active) == (1, 1, 0)
    assert counters.take().peak == 0


async def test_a_long_connection_is_counted_whole_in_the_interval_it_ends(
    relay: Relay, counters: Counters
) -> None:
    snapshots = []
    async with connect(relay.port) as client:
        for chunk in (b"a", b"bb", b"ccc"):  # one interval each, the connection open
            assert await round_trip(*client, chunk) == chunk
            snapshots.append(counters.take())
    await relay.wait_until_idle()
    last = counters.take()

    for interval in snapshots:  # what a report sent mid-connection says: no request yet
        assert (interval.requests, sum(interval.latency_buckets), interval.active) == (0, 0, 1)
    assert [s.bytes_in for s in snapshots] == [1, 2, 3]
    assert [s.connections for s in snapshots] == [1, 0, 0]
    assert (last.requests, last.successes, sum(last.latency_buckets)) == (1, 1, 1)
    assert (last.connections, last.active, last.bytes_in) == (0, 0, 0)


async def test_peak_concurrency_counts_connections_open_at_once(
    relay: Relay, counters: Counters
) -> None:
    async with connect(relay.port) as one, connect(relay.port) as two:
        async with connect(relay.port) as three:
            for reader, writer in (one, two, three):
                await round_trip(reader, writer, b"ping")
            assert counters.active == 3
        await round_trip(*one, b"ping")
    await relay.wait_until_idle()

    snapshot = counters.take()
    assert (snapshot.connections, snapshot.peak, snapshot.active) == (3, 3, 0)
    assert snapshot.bytes_in == snapshot.bytes_out == 16


async def test_half_close_reaches_the_target_and_the_answer_comes_back(
    counters: Counters,
) -> None:
    echo = await EchoServer(marker=b"<eof>").start()
    relay = Relay("127.0.0.1", 0, echo.address, counters)
    await relay.start()
    try:
        async with connect(relay.port) as (reader, writer):
            writer.write(b"last words")
            writer.write_eof()
            async with asyncio.timeout(5):
                answer = await reader.read()
        await relay.wait_until_idle()
    finally:
        await relay.stop()
        await echo.close()
    assert answer == b"last words<eof>"
    assert (counters.bytes_in, counters.bytes_out, counters.successes) == (10, 15, 1)


async def test_retarget_keeps_open_connections_on_the_old_target(
    echo: EchoServer, relay: Relay
) -> None:
    shouting = await EchoServer(bytes.upper).start()
    try:
        async with connect(relay.port) as old:
            assert await round_trip(*old, b"abc") == b"abc"
            relay.retarget(shouting.address)
            assert relay.target == shouting.address
            async with connect(relay.port) as new:
                assert await round_trip(*new, b"abc") == b"ABC"
            assert await round_trip(*old, b"def") == b"def"
    finally:
        await shouting.close()
    assert (echo.accepted, shouting.accepted) == (1, 1)


async def test_connections_over_the_limit_are_closed_and_counted_as_errors(
    echo: EchoServer, counters: Counters
) -> None:
    relay = Relay("127.0.0.1", 0, echo.address, counters, max_connections=2)
    await relay.start()
    try:
        async with connect(relay.port) as one, connect(relay.port) as two:
            await round_trip(*one, b"1")
            await round_trip(*two, b"2")
            async with connect(relay.port) as (extra, _):
                assert await closed_by_peer(extra)
            assert (counters.connections, counters.errors, counters.active) == (3, 1, 2)
        await relay.wait_until_idle()
        async with connect(relay.port) as again:
            assert await round_trip(*again, b"3") == b"3"
    finally:
        await relay.stop()
    assert echo.accepted == 3


async def test_configure_changes_the_limit(relay: Relay, counters: Counters) -> None:
    relay.configure(idle_timeout=60, max_connections=1)
    async with connect(relay.port) as one:
        await round_trip(*one, b"1")
        async with connect(relay.port) as (extra, _):
            assert await closed_by_peer(extra)
    assert counters.errors == 1


async def test_stop_closes_the_listener_and_every_connection(
    relay: Relay, counters: Counters
) -> None:
    port = relay.port
    async with connect(port) as one, connect(port) as two:
        await round_trip(*one, b"1")
        await round_trip(*two, b"2")
        await relay.stop()
        assert await closed_by_peer(one[0])
        assert await closed_by_peer(two[0])
    with pytest.raises(ConnectionRefusedError):
        async with connect(port):
            pass
    assert (counters.active, counters.successes, counters.errors) == (0, 2, 0)


async def test_unreachable_target_counts_an_error(counters: Counters) -> None:
    relay = Relay("127.0.0.1", 0, f"127.0.0.1:{unused_port()}", counters)
    await relay.start()
    try:
        async with connect(relay.port) as (reader, _):
            assert await closed_by_peer(reader)
        await relay.wait_until_idle()
    finally:
        await relay.stop()
    snapshot = counters.take()
    assert (snapshot.connections, snapshot.errors, snapshot.successes) == (1, 1, 0)
    assert (snapshot.requests, snapshot.active, snapshot.peak) == (1, 0, 1)
    assert sum(snapshot.latency_buckets) == 0


async def test_idle_connections_are_closed(echo: EchoServer, counters: Counters) -> None:
    relay = Relay("127.0.0.1", 0, echo.address, counters, idle_timeout=0.2)
    await relay.start()
    try:
        async with connect(relay.port) as (reader, writer):
            await round_trip(reader, writer, b"then silence")
            assert await closed_by_peer(reader)
        await relay.wait_until_idle()
    finally:
        await relay.stop()
    assert (counters.successes, counters.errors) == (1, 0)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("localhost:0", ("localhost", 0)),
        (":8080", ("", 8080)),
        ("[::1]:443", ("::1", 443)),
    ],
)
def test_parse_address(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["", "host", "host:", "host:http", "host:70000", "host:-1"])
def test_parse_address_refuses(address: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        parse_address(address)
