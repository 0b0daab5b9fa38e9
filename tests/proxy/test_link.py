"""The agent-proxy link (tplink.mux) over a real WebSocket on loopback: per-lane flow
control without head-of-line blocking, resets both ways, the end of the connection, hostile
frames, and (hypothesis) that every lane delivers exactly what was sent, in order; then the
proxy's link endpoint refusing agents the control plane refuses."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from tunnelplane.v1 import proxy_link_pb2

from proxy import links
from tests.helpers import eventually
from tests.proxy.conftest import KEY, TUNNEL, Stack
from tplink import mux

Request = proxy_link_pb2.ExchangeRequest  # what the agent sends
Response = proxy_link_pb2.ExchangeResponse  # what the proxy sends
ProxySide = mux.Link[Request, Response]
AgentSide = mux.Link[Response, Request]
AgentLane = mux.Lane[Response, Request]


@dataclass
class Pair:
    proxy: ProxySide
    agent: AgentSide
    lanes: asyncio.Queue[AgentLane] = field(default_factory=asyncio.Queue)
    server_socket: web.WebSocketResponse | None = None
    client_socket: aiohttp.ClientWebSocketResponse | None = None


@contextlib.asynccontextmanager
async def linked() -> AsyncIterator[Pair]:
    """A proxy side and an agent side joined by one WebSocket; the agent side's new lanes
    arrive in ``pair.lanes``."""
    ready: asyncio.Future[tuple[ProxySide, web.WebSocketResponse]] = (
        asyncio.get_running_loop().create_future()
    )
    done = asyncio.Event()

    async def accept(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse(max_msg_size=mux.MAX_FRAME)
        await socket.prepare(request)
        link: ProxySide = mux.Link(socket, Request)
        ready.set_result((link, socket))
        await link.run()
        done.set()
        return socket

    app = web.Application()
    app.router.add_get(mux.PATH, accept)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    session = aiohttp.ClientSession()
    client = await session.ws_connect(f"http://127.0.0.1:{port}{mux.PATH}",
                                      max_msg_size=mux.MAX_FRAME)  # fmt: skip
    lanes: asyncio.Queue[AgentLane] = asyncio.Queue()
    agent: AgentSide = mux.Link(client, Response, lanes.put_nowait)
    reading = asyncio.create_task(agent.run())
    proxy, server_socket = await ready
    try:
        yield Pair(proxy, agent, lanes, server_socket, client)
    finally:
        await client.close()
        await asyncio.gather(reading, return_exceptions=True)
        await session.close()
        await runner.cleanup()


def piece(size: int) -> Request:
    return Request(data=b"x" * size)


async def open_lane(pair: Pair) -> tuple[mux.Lane[Request, Response], AgentLane]:
    """A lane opened by the proxy side with a request head, and its agent side."""
    lane = pair.proxy.open()
    await lane.send(Response(head=proxy_link_pb2.HttpHead(method="GET", target="/")))
    far = await asyncio.wait_for(pair.lanes.get(), 5)
    first = await far.receive()
    assert first is not None
    assert first.head.target == "/"
    return lane, far


async def test_a_stalled_lane_holds_at_most_its_window_and_the_others_flow_on() -> None:
    async with linked() as pair:
        stalled, stalled_far = await open_lane(pair)
        sent = 0

        async def flood() -> None:
            nonlocal sent
            while True:
                await stalled_far.send(piece(64 * 1024))
                sent += 64 * 1024

        flooding = asyncio.create_task(flood())
        await eventually(lambda: sent > 0)
        await asyncio.sleep(0.2)  # whatever would flow without flow control flows now
        assert sent <= mux.WINDOW + 64 * 1024, sent  # the window and one message at most
        # The stalled lane does not hold up another lane on the same connection.
        other, other_far = await open_lane(pair)
        await other_far.send(Request(head=proxy_link_pb2.HttpHead(status=200, complete=True)))
        answer = await asyncio.wait_for(other.receive(), 5)
        assert answer is not None
        assert answer.head.status == 200
        # Reading the stalled lane lets its sender go on.
        before = sent
        for _ in range(mux.WINDOW // (64 * 1024) + 2):
            assert await asyncio.wait_for(stalled.receive(), 5) is not None
        await eventually(lambda: sent > before)
        flooding.cancel()
        await asyncio.gather(flooding, return_exceptions=True)


async def test_a_reset_reaches_the_other_side_at_once_either_way() -> None:
    async with linked() as pair:
        lane, far = await open_lane(pair)
        told: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        far.on_reset = told.set_result
        lane.reset("the web client went away")
        assert await asyncio.wait_for(told, 5) == "the web client went away"
        assert await far.receive() is None
        with pytest.raises(mux.LaneClosedError):
            await far.send(piece(1))
        assert (pair.proxy.lanes, pair.agent.lanes) == (0, 0)
        # The agent's side resets too; what it sent before arrives first.
        lane, far = await open_lane(pair)
        await far.send(piece(3))
        far.reset("the agent failed")
        received = await asyncio.wait_for(lane.receive(), 5)
        assert received is not None
        assert received.data == b"xxx"
        assert await asyncio.wait_for(lane.receive(), 5) is None
        assert lane.reason == "the agent failed"


async def test_the_end_of_the_connection_ends_every_lane() -> None:
    async with linked() as pair:
        lanes = [await open_lane(pair) for _ in range(3)]
        ended: list[str] = []
        for _, far in lanes:
            far.on_reset = ended.append
        assert pair.server_socket is not None
        await pair.server_socket.close()
        await eventually(lambda: len(ended) == 3)
        for near, far in lanes:
            assert await asyncio.wait_for(near.receive(), 5) is None
            assert await far.receive() is None
        with pytest.raises(mux.LaneClosedError):
            pair.proxy.open()


async def test_frames_of_finished_lanes_are_ignored_and_a_bad_frame_closes_the_link() -> None:
    async with linked() as pair:
        lane, far = await open_lane(pair)
        lane.finish()
        await far.send(piece(10))  # late: the proxy side finished this lane
        far.finish()
        again, again_far = await open_lane(pair)  # the link goes on
        await again_far.send(piece(2))
        received = await asyncio.wait_for(again.receive(), 5)
        assert received is not None
        assert received.data == b"xx"
        # A MESSAGE on a number the agent side has already passed is not a new lane.
        await pair.proxy.write(struct.pack("!IB", 1, mux.MESSAGE) + Response().SerializeToString())
        await asyncio.sleep(0.05)
        assert pair.lanes.empty()
        assert pair.client_socket is not None
        await pair.client_socket.send_bytes(b"\x00\x00")  # shorter than a header
        await eventually(lambda: pair.proxy.closed)
        assert "protocol" in pair.proxy.closed
        assert await asyncio.wait_for(again.receive(), 5) is None


async def _deliver_exactly(plan: list[tuple[int, int, bool]]) -> None:
    async with linked() as pair:
        pairs = [await open_lane(pair) for _ in range(3)]
        wanted: list[list[tuple[int, bool]]] = [[] for _ in pairs]
        for lane_index, size, raw in plan:
            wanted[lane_index].append((size, raw))

        async def send(index: int) -> None:
            for size, raw in wanted[index]:
                if raw:  # a DATA frame: the bytes as they are
                    await pairs[index][1].send_data(memoryview(b"x" * size))
                else:
                    await pairs[index][1].send(piece(size))
            await pairs[index][1].send(Request(end=proxy_link_pb2.HttpEnd()))

        async def read(index: int) -> list[tuple[int, bool]]:
            got = []
            while (message := await pairs[index][0].receive()) is not None:
                if isinstance(message, bytes):
                    data, raw = message, True
                elif message.HasField("end"):
                    return got
                else:
                    data, raw = message.data, False
                assert set(data) <= {ord("x")}
                got.append((len(data), raw))
            raise AssertionError("the lane ended early")

        results = await asyncio.wait_for(
            asyncio.gather(*(read(i) for i in range(3)), *(send(i) for i in range(3))), 20
        )
        assert results[:3] == wanted


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2), st.integers(0, 600 * 1024), st.booleans()), max_size=12)
)
def test_every_lane_delivers_exactly_what_was_sent_in_order(
    plan: list[tuple[int, int, bool]],
) -> None:
    """The law: whatever the sizes, the kinds (messages, raw pieces) and however the lanes
    interleave on one connection, each lane's reader gets its sender's messages and pieces,
    whole, in order, each as the kind it was sent, and nothing else."""
    asyncio.run(_deliver_exactly(plan))


async def test_the_link_endpoint_refuses_agents_the_control_plane_refuses(stack: Stack) -> None:
    url = f"http://{stack.link}{mux.PATH}"
    cases = [
        ({mux.TUNNEL_HEADER: TUNNEL}, 401),  # no key
        ({"Authorization": "Bearer wrong", mux.TUNNEL_HEADER: TUNNEL}, 401),
        ({"Authorization": f"Bearer {KEY}", mux.TUNNEL_HEADER: "users/u/tunnels/none"}, 404),
    ]
    async with aiohttp.ClientSession() as session:
        for headers, status in cases:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refusal:
                await session.ws_connect(url, headers={**headers, mux.AGENT_HEADER: "x"})
            assert refusal.value.status == status, headers
        with pytest.raises(aiohttp.WSServerHandshakeError) as refusal:
            await session.ws_connect(f"http://{stack.link}/elsewhere",
                                     headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
        assert refusal.value.status == 404
    assert stack.proxy.registry.links(TUNNEL) == 1  # only the stack's own agent


async def test_a_request_waits_for_a_lane_when_every_link_is_full(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A link carries at most MAX_LANES at once; one more request waits the config's
    claim time for a lane to free, and gets 503 NO_AGENT if none does."""
    monkeypatch.setattr(links, "MAX_LANES", 1)
    stack.proxy.web.configure(replace(stack.proxy.web.settings, claim_wait=0.3))
    slow = asyncio.create_task(stack.client.get(stack.base + "/api/generate?n=8&every=0.1"))
    await eventually(lambda: stack.proxy.web.active == 1)
    refused = await stack.client.get(stack.base + "/echo")
    assert (refused.status_code, refused.json()["error"]["reason"]) == (503, "NO_AGENT")
    stack.proxy.web.configure(replace(stack.proxy.web.settings, claim_wait=10.0))
    waited = asyncio.create_task(stack.client.get(stack.base + "/echo"))
    assert (await slow).status_code == 200
    assert (await waited).status_code == 200  # it took the lane the first one freed
