"""How the link protocol was chosen: one process, loopback, 50 concurrent lanes doing 1 KiB
round trips (a request out, a response back) over each candidate, and the CPU each round
trip costs both ends together. ``python -m bench.link_protocols`` (it needs ``websockets``
beside the project's packages: ``pip install websockets``; it is not a dependency).

- **grpc**: one grpc.aio bidirectional stream per lane (what ``ProxyLinkService.Exchange``
  was, the link's first design), protobuf messages.
- **websockets**: one ``websockets`` connection with every lane multiplexed on it, a 5-byte
  header (lane id, kind) per message: the framing of the multiplexer, without its flow
  control.
- **aiohttp**: the same over one aiohttp WebSocket: what the link is now (tplink/mux.py).
"""

from __future__ import annotations

import asyncio
import resource
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable

LANES, ROUNDS, SIZE = 50, 200, 1024


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def grpc_lanes() -> tuple[float, float]:
    import grpc
    from tunnelplane.v1 import proxy_link_pb2 as pb
    from tunnelplane.v1 import proxy_link_pb2_grpc as pg

    class Echo(pg.ProxyLinkServiceServicer):
        async def Exchange(self, it, ctx):  # type: ignore[no-untyped-def]  # noqa: N802, ARG002
            while (m := await ctx.read()) is not grpc.aio.EOF:
                await ctx.write(pb.ExchangeResponse(data=m.data))

    options = [("grpc.http2.bdp_probe", 0)]
    server = grpc.aio.server(options=options)
    pg.add_ProxyLinkServiceServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
    stub = pg.ProxyLinkServiceStub(channel)

    async def lane() -> None:
        call = stub.Exchange()
        for _ in range(ROUNDS):
            await call.write(pb.ExchangeRequest(data=b"x" * SIZE))
            await call.read()
        await call.done_writing()

    started, used = time.perf_counter(), cpu()
    await asyncio.gather(*(lane() for _ in range(LANES)))
    result = time.perf_counter() - started, cpu() - used
    await channel.close()
    await server.stop(0)
    return result


async def multiplexed(
    send: Callable[[bytes], Awaitable[object]], messages: AsyncIterator[bytes]
) -> tuple[float, float]:
    """LANES lanes of ROUNDS round trips each over one connection (``send`` and the echoed
    ``messages``), each behind a 5-byte lane header; wall time and CPU seconds."""
    waiting: dict[int, asyncio.Future[bytes]] = {}

    async def reader() -> None:
        async for message in messages:
            lane_id = struct.unpack_from("!IB", message)[0]
            waiting.pop(lane_id).set_result(message)

    read = asyncio.create_task(reader())

    async def lane(lane_id: int) -> None:
        header = struct.pack("!IB", lane_id, 2)
        for _ in range(ROUNDS):
            future = asyncio.get_running_loop().create_future()
            waiting[lane_id] = future
            await send(header + b"x" * SIZE)
            await future

    started, used = time.perf_counter(), cpu()
    await asyncio.gather(*(lane(i) for i in range(LANES)))
    result = time.perf_counter() - started, cpu() - used
    read.cancel()
    return result


async def websocket_lanes() -> tuple[float, float]:
    import websockets

    async def echo(ws) -> None:  # type: ignore[no-untyped-def]
        async for message in ws:
            await ws.send(message)

    server = await websockets.serve(echo, "127.0.0.1", 0, compression=None)
    port = next(iter(server.sockets)).getsockname()[1]
    client = await websockets.connect(f"ws://127.0.0.1:{port}", compression=None)
    result = await multiplexed(client.send, aiter(client))
    await client.close()
    server.close()
    return result


async def aiohttp_lanes() -> tuple[float, float]:
    import aiohttp
    from aiohttp import web

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False, autoping=True)
        await ws.prepare(request)
        async for message in ws:
            await ws.send_bytes(message.data)
        return ws

    app = web.Application()
    app.router.add_get("/", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    session = aiohttp.ClientSession()
    client = await session.ws_connect(f"http://127.0.0.1:{port}/", compress=0, autoping=True)

    async def payloads() -> AsyncIterator[bytes]:
        async for message in client:
            yield message.data

    result = await multiplexed(client.send_bytes, payloads())
    await client.close()
    await session.close()
    await runner.cleanup()
    return result


def main() -> int:
    trips = LANES * ROUNDS
    runs = (("grpc", grpc_lanes), ("websockets", websocket_lanes), ("aiohttp", aiohttp_lanes))
    for name, run in runs:
        wall, used = asyncio.run(run())
        rate, each = trips / wall, used / trips * 1e6
        print(f"{name:<10} {rate:>8.0f} round trips/s  {each:>5.0f} µs CPU each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
