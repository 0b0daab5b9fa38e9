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
import grpc
from tunnelplane.v1 import proxy_link_pb2

if TYPE_CHECKING:
    from agent.exchange import Call

Request = proxy_link_pb2.ExchangeRequest
Message = proxy_link_pb2.WebSocketMessage
#: Largest message carried (the exchange's messages stay under gRPC's 4 MiB).
MAX_MESSAGE = 3 * 1024 * 1024
CLOSING = 5.0


def ws_url(base: str, target: str) -> str:
    """The local service's WebSocket URL for an HTTP base URL and a request target."""
    return ("wss" + base[5:] if base.startswith("https") else "ws" + base[4:]) + target


async def carry(
    call: Call,
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
        await call.write(Request(head=head))
        await call.write(Request(end=proxy_link_pb2.HttpEnd()))
        await call.done_writing()
        return
    accepted = [proxy_link_pb2.HttpHeader(name="Sec-WebSocket-Protocol", value=ws.protocol.encode())
                ] if ws.protocol else []  # fmt: skip
    await call.write(Request(head=proxy_link_pb2.HttpHead(status=101, websocket=True,
                                                          headers=accepted)))  # fmt: skip
    await _bridge(call, ws)


async def _bridge(call: Call, ws: aiohttp.ClientWebSocketResponse) -> None:
    async def local_to_proxy() -> None:
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                carried = Message(text=True, data=message.data.encode())
            elif message.type == aiohttp.WSMsgType.BINARY:
                carried = Message(data=message.data)
            else:
                break
            await call.write(Request(websocket=carried))
        await call.write(Request(websocket=Message(close_code=ws.close_code or 1000)))
        await call.done_writing()

    async def proxy_to_local() -> None:
        while True:
            message = await call.read()
            if not isinstance(message, proxy_link_pb2.ExchangeResponse):
                break  # the proxy ended the call
            if not message.HasField("websocket"):
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
        with contextlib.suppress(ConnectionError, grpc.aio.AioRpcError):
            await ws.close()
