"""Running the gateway's ASGI app under uvicorn inside an existing event loop.

The embedded gateway shares the gRPC server's loop, so uvicorn must not take over the
process's signals; whoever owns the loop decides when to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Generator
from typing import Any

import uvicorn

from gateway.guard import ConnectionGuard, guarded


class _Server(uvicorn.Server):
    """uvicorn without signal handling, and with an event for "listening"."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


class HttpServer:
    """An HTTP/1.1 listener for an ASGI app (httptools parser), with read timeouts and a
    per-address connection cap (:class:`gateway.guard.ConnectionGuard`). With
    ``reuse_port``, other processes may listen on the same port (``SO_REUSEPORT``)."""

    def __init__(
        self,
        app: Any,
        host: str,
        port: int,
        *,
        certfile: str = "",
        keyfile: str = "",
        graceful_seconds: float = 10.0,
        guard: ConnectionGuard | None = None,
        reuse_port: bool = False,
    ) -> None:
        self._reuse_port = reuse_port
        self._config = uvicorn.Config(
            app,
            lifespan="off",
            log_level="warning",
            access_log=False,
            http=guarded(guard or ConnectionGuard()),
            ws="none",
            server_header=False,
            date_header=False,
            # Which forwarded headers to believe is the application's decision, not uvicorn's.
            proxy_headers=False,
            ssl_certfile=certfile or None,
            ssl_keyfile=keyfile or None,
            timeout_graceful_shutdown=int(graceful_seconds) or None,
            backlog=2048,
        )
        self._host = host
        self._port = port
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> None:
        """Bind and start accepting."""
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only then, and
        # without it every response (headers, then body) waits ~40 ms for a delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self._reuse_port:  # processes of one group listen on one port; the kernel shares
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((self._host, self._port))
        sock.setblocking(False)  # noqa: FBT003 - the socket API
        self.port = sock.getsockname()[1]
        self._server = _Server(self._config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="http")
        ready = asyncio.ensure_future(self._server.ready.wait())
        done, _ = await asyncio.wait({ready, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if self._task in done:
            ready.cancel()
            self._task.result()
            raise RuntimeError("the HTTP server stopped during start-up")

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (up to the grace), close."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        await self._task
