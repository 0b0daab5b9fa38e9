"""WebSocket upgrades through the proxy: the web client's WebSocket ends here (aiohttp
speaks the protocol, answers pings and closes), and each message is carried whole over the
exchange to the agent, whose own WebSocket to the local service does the same on the far
side. Nothing is buffered beyond one message each way: each send waits for its socket or
the exchange's flow-control window."""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import WSMsgType, web
from tunnelplane.v1 import proxy_link_pb2

from proxy.links import Exchange

Response = proxy_link_pb2.ExchangeResponse
Message = proxy_link_pb2.WebSocketMessage
#: Header fields of the client's handshake that the agent's own handshake replaces.
HANDSHAKE = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions"})
#: Largest message carried (a link's frames stay under tplink.mux.MAX_FRAME).
MAX_MESSAGE = 3 * 1024 * 1024
#: How long one side may take to close after the other did.
CLOSING = 5.0


def chosen_protocol(head: proxy_link_pb2.HttpHead) -> str:
    """The subprotocol the local service chose, if any."""
    for field in head.headers:
        if field.name.lower() == "sec-websocket-protocol":
            return field.value.decode("latin-1").strip()
    return ""


async def bridge(
    request: web.BaseRequest, exchange: Exchange, head: proxy_link_pb2.HttpHead
) -> web.WebSocketResponse:
    """Accept the client's upgrade as the local service did, then carry messages both ways
    until either side closes."""
    protocol = chosen_protocol(head)
    ws = web.WebSocketResponse(
        protocols=(protocol,) if protocol else (), max_msg_size=MAX_MESSAGE, heartbeat=30.0
    )
    await ws.prepare(request)

    async def client_to_agent() -> None:
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                carried = Message(text=True, data=message.data.encode())
            elif message.type == WSMsgType.BINARY:
                carried = Message(data=message.data)
            else:
                break
            await exchange.send(Response(websocket=carried))
        code = ws.close_code or 1000
        await exchange.send(Response(websocket=Message(close_code=code)))

    async def agent_to_client() -> None:
        while (message := await exchange.receive()) is not None:
            if isinstance(message, bytes) or not message.HasField("websocket"):
                break  # end or failure: the local side is gone
            carried = message.websocket
            if carried.close_code:
                await ws.close(code=carried.close_code, message=carried.data[:123])
                return
            if carried.text:
                await ws.send_str(carried.data.decode("utf-8", "replace"))
            else:
                await ws.send_bytes(carried.data)
        await ws.close(code=1011, message=b"the local service went away")

    tasks = [asyncio.create_task(client_to_agent()), asyncio.create_task(agent_to_client())]
    try:
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if pending:
            await asyncio.wait(pending, timeout=CLOSING)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(ConnectionError):
            await ws.close()
    return ws
