"""A scriptable webhook receiver for tests and the bench: an aiohttp.web app on loopback that
records every request and answers as told (a status, a ``Retry-After``, a delay, no answer
at all), path by path. ``await receiver.wait_for(n)`` waits (no sleeps) until ``n`` requests
have been answered; :meth:`Receiver.hold` keeps a path's requests waiting until
:meth:`Receiver.release`, counting how many wait at once."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.helpers import eventually


@dataclass(frozen=True)
class Reply:
    """One scripted answer."""

    status: int = 200
    retry_after: str = ""
    #: Seconds to wait before answering (longer than the sender's timeout: a timeout).
    delay: float = 0.0
    #: Close the connection without answering (the sender gets no response at once).
    drop: bool = False


@dataclass(frozen=True)
class Seen:
    """One request as received."""

    path: str
    headers: dict[str, str]
    body: bytes
    time: float
    status: int

    @property
    def json(self) -> Any:
        """The body, parsed."""
        return json.loads(self.body)

    @property
    def message_id(self) -> str:
        """The ``webhook-id`` header."""
        return self.headers.get("webhook-id", "")


@dataclass
class Receiver:
    """See the module docstring. Unscripted requests get 200."""

    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    #: Requests being handled now, and the most at once, per path.
    active: Counter[str] = field(default_factory=Counter)
    peak: Counter[str] = field(default_factory=Counter)
    _script: dict[str, deque[Reply]] = field(default_factory=dict)
    _held: dict[str, asyncio.Event] = field(default_factory=dict)
    _changed: asyncio.Condition | None = None
    _runner: web.AppRunner | None = None

    async def start(self) -> Receiver:
        """Listen on 127.0.0.1, a free port."""
        self._changed = asyncio.Condition()
        app = web.Application()
        app.router.add_route("POST", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server  # aiohttp does not expose the bound port otherwise
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return self

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> Receiver:
        return await self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    def url(self, path: str = "/hook") -> str:
        """The URL of ``path``."""
        return f"http://127.0.0.1:{self.port}{path}"

    def script(self, path: str, *replies: Reply | int) -> None:
        """Answer the next requests to ``path`` with ``replies`` in order (then 200)."""
        queue = self._script.setdefault(path, deque())
        queue.extend(r if isinstance(r, Reply) else Reply(r) for r in replies)

    def hold(self, path: str) -> None:
        """Keep requests to ``path`` waiting, unanswered, until :meth:`release`."""
        self._held[path] = asyncio.Event()

    def release(self, path: str) -> None:
        """Let the requests to ``path`` be answered (now and from now on)."""
        if (gate := self._held.pop(path, None)) is not None:
            gate.set()

    def at(self, path: str) -> list[Seen]:
        """The requests ``path`` received."""
        return [s for s in self.seen if s.path == path]

    async def wait_for(
        self, count: int, path: str | None = None, within: float = 20.0
    ) -> list[Seen]:
        """Wait until ``count`` requests (to ``path``, if given) have arrived; them all."""
        return await self.wait_until(
            lambda seen: len([s for s in seen if path is None or s.path == path]) >= count,
            within,
            path,
        )

    async def wait_until(
        self, done: Callable[[list[Seen]], bool], within: float = 20.0, path: str | None = None
    ) -> list[Seen]:
        """Wait until ``done(seen)``; the requests (to ``path``, if given)."""
        assert self._changed is not None
        await eventually(lambda: done(self.seen), within, changed=self._changed)
        return [s for s in self.seen if path is None or s.path == path]

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        path = request.path
        self.active[path] += 1
        self.peak[path] = max(self.peak[path], self.active[path])
        try:
            await self._notify()
            if (gate := self._held.get(path)) is not None:
                await gate.wait()
            queue = self._script.get(path)
            reply = queue.popleft() if queue else Reply()
            if reply.delay:
                await asyncio.sleep(reply.delay)
        finally:
            self.active[path] -= 1
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.seen.append(Seen(path, headers, body, time.monotonic(), reply.status))
        await self._notify()
        if reply.drop:
            assert request.transport is not None
            request.transport.close()
            raise web.HTTPException()  # never written: the connection is gone
        extra = {"Retry-After": reply.retry_after} if reply.retry_after else {}
        return web.Response(status=reply.status, text="ok", headers=extra)

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()
