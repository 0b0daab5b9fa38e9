"""The local service of the proxy bench's streaming runs: ``python -m bench.stream_service
PORT``. ``/stream?n=N&every=S`` writes N chunks S seconds apart, each holding the
CLOCK_MONOTONIC nanoseconds at which it was written (the machine's one clock, so a client
in another process can tell how long each chunk took to reach it); ``/idle`` sends its
headers and then nothing for an hour (an open, idle stream)."""

from __future__ import annotations

import asyncio
import sys
import time

from aiohttp import web


async def stream(request: web.Request) -> web.StreamResponse:
    count, every = int(request.query.get("n", "20")), float(request.query.get("every", "0.02"))
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    for _ in range(count):
        await response.write(b"%d\n" % time.monotonic_ns())
        await asyncio.sleep(every)
    await response.write_eof()
    return response


async def idle(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b": open\n\n")
    await asyncio.sleep(3600)
    return response


def main() -> None:
    app = web.Application()
    app.router.add_get("/stream", stream)
    app.router.add_get("/idle", idle)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None,
                handler_cancellation=True)  # fmt: skip


if __name__ == "__main__":
    main()
