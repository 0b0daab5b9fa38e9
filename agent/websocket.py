"""WebSocket upgrades on the agent's side: a web client's upgrade, carried by the proxy,
becomes the agent's own WebSocket to the local service (aiohttp speaks the protocol and
negotiates its own key), and messages are carried whole both ways until either side
closes. A local service that refuses the upgrade answers with its status as a plain
response."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import aiohttp
from tunnelplane.v1 import proxy_link_pb2

from tplink import mux

if TYPE_CHECKING:
    from agent.exchange import Lane

Request = proxy_link_pb2.ExchangeRequest
Message = proxy_link_pb2.WebSocketMessage
#: Largest message carried (a link's frames stay under tplink.mux.MAX_FRAME).
MAX_MESSAGE = 3 * 1024 * 1024
CLOSING = 5.0


def ws_url(base: str, target: str) -> str:
    """The local service's WebSocket URL for an HTTP base URL and a request target."""
    return ("wss" + base[5:] if base.startswith("https") else "ws" + base[4:]) + target


async def carry(
    lane: Lane,
    session: aiohttp.ClientSession,
    url: str,
    headers: list[tuple[str, str]],
) -> None:
    """Open the local WebSocket, tell the proxy how it went, then carry messages."""
    protocols = [
        token.strip()
        for name, value in headers
        if name.lower() == "sec-websocket-protocol"
        for token in value.split(",")
        if token.strip()
    ]
    kept = [(n, v) for n, v in headers if n.lower() != "sec-websocket-protocol"]
    try:
        ws = await session.ws_connect(
            url, headers=kept, protocols=protocols, max_msg_size=MAX_MESSAGE, heartbeat=30.0
        )
    except aiohttp.WSServerHandshakeError as exc:
        head = proxy_link_pb2.HttpHead(status=exc.status or 502)
        await lane.send(Request(head=head))
        await lane.send(Request(end=proxy_link_pb2.HttpEnd()))
        return
    accepted = [proxy_link_pb2.HttpHeader(name="Sec-WebSocket-Protocol", value=ws.protocol.encode())
                ] if ws.protocol else []  # fmt: skip
    await lane.send(Request(head=proxy_link_pb2.HttpHead(status=101, websocket=True,
                                                         headers=accepted)))  # fmt: skip
    await _bridge(lane, ws)


async def _bridge(lane: Lane, ws: aiohttp.ClientWebSocketResponse) -> None:
    async def local_to_proxy() -> None:
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                carried = Message(text=True, data=message.data.encode())
            elif message.type == aiohttp.WSMsgType.BINARY:
                carried = Message(data=message.data)
            else:
                break
            await lane.send(Request(websocket=carried))
        await lane.send(Request(websocket=Message(close_code=ws.close_code or 1000)))

    async def proxy_to_local() -> None:
        while True:
            message = await lane.receive()
            if message is None:
                break  # the proxy ended the lane
            if isinstance(message, bytes) or not message.HasField("websocket"):
                continue
            carried = message.websocket
            if carried.close_code:
                await ws.close(code=carried.close_code, message=carried.data[:123])
                return
            if carried.text:
                await ws.send_str(carried.data.decode("utf-8", "replace"))
            else:
                await ws.send_bytes(carried.data)
        await ws.close()

    tasks = [asyncio.create_task(local_to_proxy()), asyncio.create_task(proxy_to_local())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(ConnectionError, mux.LaneClosedError):
            await ws.close()
