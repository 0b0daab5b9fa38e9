"""A local HTTP service standing in for an LLM server: token streams (SSE, Ollama-style
NDJSON, chunked text), a late first token, downloads, uploads, and a request that waits
forever so a test can see it dropped. Real aiohttp on loopback."""

from __future__ import annotations

import asyncio
import hashlib

import orjson
from aiohttp import web


class LocalService:
    """Records what it saw: request headers, upload digests, dropped requests."""

    def __init__(self) -> None:
        self.seen_headers: list[dict[str, str]] = []
        self.written = 0  # body bytes /download has handed to its connection
        self.ws_closed = asyncio.Event()
        self.dropped = asyncio.Event()
        self.started = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> LocalService:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/echo{tail:.*}", self.echo)
        app.router.add_get("/api/generate", self.ndjson)
        app.router.add_get("/sse", self.sse)
        app.router.add_get("/text", self.text)
        app.router.add_get("/late", self.late)
        app.router.add_get("/download", self.download)
        app.router.add_post("/upload", self.upload)
        app.router.add_get("/hang", self.hang)
        app.router.add_get("/reset", self.reset)
        app.router.add_get("/ws", self.websocket)
        self._runner = web.AppRunner(app, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def close(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def echo(self, request: web.Request) -> web.Response:
        self.seen_headers.append(dict(request.headers))
        body = await request.read()
        return web.json_response(
            {"method": request.method, "path": request.path_qs, "body": body.decode(),
             "host": request.host},
            headers={"X-Local": "yes"},
        )  # fmt: skip

    async def _stream(
        self, request: web.Request, content_type: str, pieces: list[bytes], every: float
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": content_type})
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece)
            await asyncio.sleep(every)
        await response.write_eof()
        return response

    async def ndjson(self, request: web.Request) -> web.StreamResponse:
        count, every = int(request.query.get("n", "5")), float(request.query.get("every", "0.05"))
        pieces = [orjson.dumps({"response": f"t{i}", "done": False}) + b"\n" for i in range(count)]
        pieces.append(orjson.dumps({"done": True}) + b"\n")
        return await self._stream(request, "application/x-ndjson", pieces, every)

    async def sse(self, request: web.Request) -> web.StreamResponse:
        count, every = int(request.query.get("n", "5")), float(request.query.get("every", "0.05"))
        pieces = [f"data: token {i}\n\n".encode() for i in range(count)]
        return await self._stream(request, "text/event-stream", pieces, every)

    async def text(self, request: web.Request) -> web.StreamResponse:
        kind = request.query.get("type", "text/plain")
        count, every = int(request.query.get("n", "5")), float(request.query.get("every", "0.05"))
        pieces = [f"piece {i}\n".encode() for i in range(count)]
        return await self._stream(request, kind, pieces, every)

    async def late(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        await asyncio.sleep(float(request.query.get("after", "1")))
        await response.write(b'{"response":"first"}\n')
        await response.write_eof()
        return response

    async def download(self, request: web.Request) -> web.StreamResponse:
        size = int(request.query["size"])
        block = bytes(range(256)) * 256  # 64 KiB
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream",
                                               "Content-Length": str(size)})  # fmt: skip
        await response.prepare(request)
        left = size
        while left > 0:
            piece = block[: min(left, len(block))]
            await response.write(piece)
            self.written += len(piece)
            left -= len(piece)
        await response.write_eof()
        return response

    async def upload(self, request: web.Request) -> web.Response:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({"size": size, "sha256": digest.hexdigest()})

    async def hang(self, request: web.Request) -> web.StreamResponse:  # noqa: ARG002
        self.started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.dropped.set()
            raise
        return web.Response()

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        """Echoes each message (text upper-cased); "close" closes with 4000."""
        ws = web.WebSocketResponse(protocols=("chat.v1",))
        await ws.prepare(request)
        async for message in ws:
            if message.type == web.WSMsgType.TEXT:
                if message.data == "close":
                    await ws.close(code=4000, message=b"asked to")
                    break
                await ws.send_str(message.data.upper())
            elif message.type == web.WSMsgType.BINARY:
                await ws.send_bytes(message.data[::-1])
        self.ws_closed.set()
        return ws

    async def reset(self, request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()
        return web.Response()
