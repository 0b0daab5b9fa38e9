"""The proxy's HTTP handling under hostile input (hypothesis): malformed request lines,
smuggling attempts (Content-Length with Transfer-Encoding, duplicate lengths, bad chunk
sizes, obs-fold), huge headers and raw bytes. The proxy never answers 500, never stops
serving, and never hands one tunnel's traffic to a request that did not name it: a
private tunnel's secret never shows in any answer to an anonymous client."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.exchange import LinkSettings, ReversePath
from tests.helpers import eventually
from tests.proxy.conftest import TUNNEL, TUNNEL_ID, Stack, close_stack, open_stack
from tests.proxy.fake_plane import KEY
from tests.proxy.local_service import LocalService

SECRET_ID = "tun_01jd3k0000000000000000000s"
SECRET_TUNNEL = TUNNEL.replace(TUNNEL_ID, SECRET_ID)
SECRET = b"SECRET-OF-B"


class SecretService(LocalService):
    async def echo(self, request):  # type: ignore[no-untyped-def]  # noqa: ARG002
        from aiohttp import web

        return web.Response(body=SECRET)


class Loop:
    """An event loop on a thread, holding the stack for every example."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine, timeout: float = 30):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[Loop, Stack, ReversePath, LocalService]]:
    loop = Loop()

    async def up() -> tuple[Stack, ReversePath, LocalService]:
        stack = await open_stack()
        secret = await SecretService().start()
        stack.plane.tunnels[SECRET_ID] = (SECRET_TUNNEL, "private")
        agent = ReversePath(LinkSettings(tunnel=SECRET_TUNNEL, agent_id="b", key=KEY))
        await agent.configure([stack.link], secret.url)
        await eventually(lambda: stack.proxy.registry.links(SECRET_TUNNEL) == 1)
        return stack, agent, secret

    stack, agent, secret = loop.run(up())
    yield loop, stack, agent, secret

    async def down() -> None:
        await agent.stop()
        await secret.close()
        await close_stack(stack)

    loop.run(down())
    loop.close()


async def exchange_raw(port: int, data: bytes, *, eof: bool = False, idle: float = 0.3) -> bytes:
    """Send ``data``; what comes back until the proxy closes or is silent for ``idle`` s.
    (A client that half-closes gets no answer: aiohttp takes that as going away.)"""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if eof:
            writer.write_eof()
        chunks = []
        try:
            while True:
                async with asyncio.timeout(idle):
                    chunk = await reader.read(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)
    finally:
        writer.close()


tokens = st.sampled_from(
    [b"GET", b"POST", b"G\x00T", b"", b" ", b"\r\n", b"HTTP/1.1", b"HTTP/9.9", b"HTTP/1.0",
     b"Host: x", f"/t/{TUNNEL_ID}/echo".encode(), f"/t/{SECRET_ID}/echo".encode(),
     f"tun-{SECRET_ID[4:]}.localhost".encode(), b"Content-Length: 5", b"Content-Length: -1",
     b"Content-Length: 99999999999999999999", b"Transfer-Encoding: chunked",
     b"Transfer-Encoding: chunked, identity", b"Transfer-Encoding:\x0bchunked",
     b"0\r\n\r\n", b"ffffffffffffffff\r\n", b"5\r\nhello\r\n", b" folded", b"\t", b":",
     b"Upgrade: websocket", b"Connection: Upgrade, Authorization", b"Expect: 100-continue",
     b"X-Forwarded-For: 10.0.0.1", b"Authorization: Bearer bad", b"\xff\xfe",
     b"Authorization: Basic Og==", b"Authorization: Basic //79:", b"Authorization: Basic"]
)  # fmt: skip
requests = st.lists(tokens, max_size=25).map(b" ".join) | st.lists(tokens, max_size=25).map(
    b"\r\n".join
)


def well_formed(target: bytes, headers: list[bytes], body: bytes) -> bytes:
    head = b"\r\n".join([b"POST " + target + b" HTTP/1.1", b"Host: 127.0.0.1", *headers])
    return head + b"\r\n\r\n" + body


SMUGGLED = b"0\r\n\r\nGET /t/" + SECRET_ID.encode() + b"/echo HTTP/1.1\r\nHost: x\r\n\r\n"
smuggling = st.builds(
    well_formed,
    st.sampled_from(
        [f"/t/{TUNNEL_ID}/echo".encode(), f"/t/{TUNNEL_ID}/../../t/{SECRET_ID}/echo".encode()]
    ),
    st.lists(st.sampled_from([b"Content-Length: 5", b"Content-Length: 50",
                              b"Transfer-Encoding: chunked", b"Content-Length: 0",
                              b"Transfer-Encoding: gzip"]), max_size=3),
    st.sampled_from([b"hello", SMUGGLED, b"5\r\nhello\r\n0\r\n\r\n"]),
)  # fmt: skip


def check(answer: bytes) -> None:
    assert SECRET not in answer
    for line in answer.split(b"\r\n"):
        if line.startswith(b"HTTP/1."):
            assert line[9:12] != b"500", answer[:300]


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.one_of(requests, smuggling))
def test_hostile_requests(
    world: tuple[Loop, Stack, ReversePath, LocalService], data: bytes
) -> None:
    loop, stack, _, _ = world
    check(loop.run(exchange_raw(stack.proxy.port, data)))


def test_smuggling_reaches_only_the_tunnel_each_request_names(
    world: tuple[Loop, Stack, ReversePath, LocalService],
) -> None:
    """A chunked body that hides a second request for the private tunnel: the first is
    carried (200), the hidden one is parsed as a request of its own and refused (401)."""
    loop, stack, _, _ = world
    target = f"/t/{TUNNEL_ID}/echo".encode()
    chunked = well_formed(target, [b"Transfer-Encoding: chunked"], SMUGGLED)
    answer = loop.run(exchange_raw(stack.proxy.port, chunked))
    check(answer)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert b"HTTP/1.1 401" in answer, answer[-300:]
    both = well_formed(target, [b"Content-Length: 5", b"Transfer-Encoding: chunked"], SMUGGLED)
    answer = loop.run(exchange_raw(stack.proxy.port, both))
    check(answer)
    assert answer.startswith(b"HTTP/1.0 400"), answer[:200]  # refused outright, not guessed


def test_huge_headers_are_refused_and_the_proxy_goes_on(
    world: tuple[Loop, Stack, ReversePath, LocalService],
) -> None:
    loop, stack, _, _ = world
    big = b"X-Big: " + b"a" * 100_000
    answer = loop.run(
        exchange_raw(stack.proxy.port, well_formed(f"/t/{TUNNEL_ID}/echo".encode(), [big], b""))
    )
    assert answer[:9] in {b"HTTP/1.0 ", b"HTTP/1.1 "}, answer[:100]
    assert answer[9:10] == b"4", answer[:100]
    many = [b"X-%d: 1" % i for i in range(5000)]
    answer = loop.run(
        exchange_raw(stack.proxy.port, well_formed(f"/t/{TUNNEL_ID}/echo".encode(), many, b""))
    )
    assert not answer.startswith(b"HTTP/1.1 5"), answer[:100]
    fine = well_formed(f"/t/{TUNNEL_ID}/echo".encode(), [b"Content-Length: 2"], b"ok")
    assert loop.run(exchange_raw(stack.proxy.port, fine)).startswith(b"HTTP/1.1 200")
    secret = well_formed(f"/t/{SECRET_ID}/echo".encode(), [b"Content-Length: 0"], b"")
    answer = loop.run(exchange_raw(stack.proxy.port, secret))
    assert answer.startswith(b"HTTP/1.1 401")
    assert SECRET not in answer
