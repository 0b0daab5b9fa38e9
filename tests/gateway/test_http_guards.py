"""The HTTP listener's guards (gateway/guard.py): a request whose headers or body arrive
too slowly is cut off with 408, and one address may hold only so many connections. Real
sockets against a real uvicorn server on a loopback port."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import pytest
import pytest_asyncio

from gateway.guard import ConnectionGuard
from gateway.serve import HttpServer
from tests.helpers import eventually

HEAD = b"POST /echo HTTP/1.1\r\nhost: test\r\n"
FAST = ConnectionGuard(header_timeout=0.5, body_timeout=0.5)


async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    """Reads the whole body, answers with its length."""
    if scope["type"] != "http":
        return
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = str(size).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def serving(guard: ConnectionGuard) -> AsyncIterator[int]:
    server = HttpServer(app, "127.0.0.1", 0, graceful_seconds=1, guard=guard)
    await server.start()
    try:
        yield server.port
    finally:
        await server.stop()


@pytest_asyncio.fixture
async def fast() -> AsyncIterator[int]:
    """A server with half-second header and body timeouts; its port."""
    async for port in serving(FAST):
        yield port


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def answer(reader: asyncio.StreamReader, within: float) -> bytes:
    """Everything the server sends until it closes the connection."""
    async with asyncio.timeout(within):
        return await reader.read()


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


async def trickle(writer: asyncio.StreamWriter, closed: asyncio.Event, chunk: bytes) -> None:
    """Send ``chunk`` every 0.1 s until the server closes (a slowloris client)."""
    while not closed.is_set():
        try:
            writer.write(chunk)
            await writer.drain()
        except ConnectionError:
            return
        with_timeout = asyncio.ensure_future(closed.wait())
        await asyncio.wait({with_timeout}, timeout=0.1)
        with_timeout.cancel()


async def slow_headers(port: int) -> tuple[bytes, float]:
    """A client that keeps sending header lines and never ends its head: what it got back
    and after how long."""
    loop = asyncio.get_running_loop()
    reader, writer = await connect(port)
    started = loop.time()
    writer.write(HEAD)
    closed = asyncio.Event()
    sender = asyncio.create_task(trickle(writer, closed, b"x-slow: a\r\n"))
    try:
        raw = await answer(reader, within=5)
    finally:
        closed.set()
        await sender
        writer.close()
    return raw, loop.time() - started


async def test_many_slow_header_connections_are_cut_within_the_timeout(fast: int) -> None:
    results = await asyncio.gather(*(slow_headers(fast) for _ in range(60)))
    for raw, seconds in results:
        assert status_of(raw) == 408
        assert b"connection: close" in raw
        assert seconds < FAST.header_timeout + 1.5  # type: ignore[operator]


async def test_a_connection_that_sends_nothing_is_closed(fast: int) -> None:
    reader, writer = await connect(fast)
    assert await answer(reader, within=3) == b""  # closed, nothing to answer
    writer.close()


async def test_a_slow_body_is_cut_with_408(fast: int) -> None:
    reader, writer = await connect(fast)
    writer.write(HEAD + b"content-length: 100\r\n\r\n" + b"x" * 10)
    raw = await answer(reader, within=3)
    assert status_of(raw) == 408
    writer.close()


async def test_a_body_whose_pauses_stay_under_the_timeout_is_served(fast: int) -> None:
    reader, writer = await connect(fast)
    writer.write(HEAD + b"content-length: 8\r\nconnection: close\r\n\r\n")
    for _ in range(8):  # 0.8 s in all, more than the timeout, never a 0.5 s pause
        writer.write(b"x")
        await writer.drain()
        await asyncio.sleep(0.1)  # the client's own pace, the thing under test
    raw = await answer(reader, within=3)
    assert status_of(raw) == 200
    assert raw.endswith(b"\r\n\r\n8")
    writer.close()


async def test_a_kept_alive_connection_gets_a_fresh_header_timeout_per_request(
    fast: int,
) -> None:
    reader, writer = await connect(fast)
    for _ in range(3):
        writer.write(HEAD + b"content-length: 2\r\n\r\nab")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        assert status_of(head) == 200
        assert await asyncio.wait_for(reader.readexactly(1), 3) == b"2"
    writer.close()


@pytest.mark.parametrize("exempt", [False, True])
async def test_one_address_may_hold_only_so_many_connections(exempt: bool) -> None:
    loopback = (ipaddress.ip_network("127.0.0.0/8"),) if exempt else ()
    guard = ConnectionGuard(header_timeout=30, body_timeout=30, max_per_address=3, exempt=loopback)
    async for port in serving(guard):
        held = [await connect(port) for _ in range(3)]
        reader, writer = await connect(port)
        if exempt:
            writer.write(HEAD + b"content-length: 0\r\nconnection: close\r\n\r\n")
            assert status_of(await answer(reader, within=3)) == 200
        else:
            refused = await answer(reader, within=3)  # at once, before reading anything
            assert status_of(refused) == 503
            assert b"retry-after: 1" in refused
            # One of the three goes away: its slot is free again.
            held[0][1].close()
            await held[0][1].wait_closed()
            await eventually_served(port)
        writer.close()
        for _, w in held:
            w.close()


async def eventually_served(port: int) -> None:
    """A new connection is served once the server has seen a held one close."""

    async def served() -> bool:
        reader, writer = await connect(port)
        writer.write(HEAD + b"content-length: 0\r\nconnection: close\r\n\r\n")
        raw = await answer(reader, within=3)
        writer.close()
        return status_of(raw) == 200

    await eventually(served, within=3, every=0.02)
