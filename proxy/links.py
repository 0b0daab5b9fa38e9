"""Agents' links: the link side of the proxy (a WebSocket on the link port, ``/_link``).

An agent dials in once per proxy, its agent key as a bearer credential and its tunnel in
``X-Tunnelplane-Tunnel``; the control plane checks the key (AuthorizeAgentLink) before the
upgrade is accepted, so a refused agent gets a plain HTTP answer (401, 403, 404, 503).
:class:`Registry` holds the links per tunnel and opens a lane (:mod:`tplink.mux`) on one
of them for each web request; the web side writes the request and reads the response on
that :class:`Exchange`, and :meth:`Exchange.finish` ends it — cleanly, or cancelled,
which the agent sees at once and turns into dropping the local request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging

from aiohttp import web
from tunnelplane.v1 import proxy_link_pb2

from proxy import credentials
from proxy.control import ControlPlane, RefusedError, UnreachableError
from tplink import mux

log = logging.getLogger("tunnelplane.proxy.links")

Request = proxy_link_pb2.ExchangeRequest
Response = proxy_link_pb2.ExchangeResponse
#: Lanes one link carries at once; a request that finds every link of its tunnel full
#: waits (the config's retries times its retry delay) for one to free.
MAX_LANES = 10_000
_STATUS = {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404,
           "FAILED_PRECONDITION": 409, "RESOURCE_EXHAUSTED": 429}  # fmt: skip


class AgentLink:
    """One agent's connection, carrying lanes for one tunnel."""

    def __init__(self, socket: web.WebSocketResponse, tunnel: str, agent_id: str) -> None:
        self.tunnel = tunnel
        self.agent_id = agent_id
        self.mux: mux.Link[Request, Response] = mux.Link(socket, Request)


class Exchange:
    """One web request's lane to an agent."""

    __slots__ = ("_lane", "agent_id", "tunnel")

    def __init__(self, link: AgentLink, lane: mux.Lane[Request, Response]) -> None:
        self.tunnel = link.tunnel
        self.agent_id = link.agent_id
        self._lane = lane

    @property
    def finished(self) -> bool:
        """Whether the exchange is over (finished here, reset, or its link closed)."""
        return self._lane.over

    @property
    def reason(self) -> str:
        """Why the exchange is over ("" while it is open)."""
        return self._lane.reason

    async def send(self, message: Response) -> None:
        """Write to the agent (waits while the lane's window is spent); raises
        :class:`tplink.mux.LaneClosedError` when the lane is over."""
        await self._lane.send(message)

    async def send_data(self, piece: bytes | memoryview) -> None:
        """Write a piece of the request body as it is (like :meth:`send`)."""
        await self._lane.send_data(piece)

    async def receive(self) -> Request | bytes | None:
        """The agent's next message (``bytes``: a piece of the response body); None when
        the lane is over."""
        return await self._lane.receive()

    def finish(self, cancel: str = "") -> None:
        """End the exchange: cleanly (both messages whole), or cancelled with ``cancel``
        as the reason, which the agent gets at once."""
        if cancel:
            self._lane.reset(cancel)
        else:
            self._lane.finish()


class Registry:
    """Agents' links per tunnel."""

    def __init__(self) -> None:
        self._links: dict[str, list[AgentLink]] = {}
        self._turn = itertools.count()
        self._freed: dict[str, collections.deque[asyncio.Future[None]]] = {}

    def linked(self, tunnel: str) -> bool:
        """Whether any agent is linked for ``tunnel``."""
        return tunnel in self._links

    def tunnels(self) -> list[str]:
        """The tunnels agents are linked for here."""
        return list(self._links)

    def links(self, tunnel: str) -> int:
        """Agents' links for ``tunnel``."""
        return len(self._links.get(tunnel, ()))

    def links_total(self) -> int:
        """Agents' links, all tunnels."""
        return sum(len(links) for links in self._links.values())

    def opened(self, link: AgentLink) -> None:
        """An agent linked."""
        self._links.setdefault(link.tunnel, []).append(link)
        self._wake(link.tunnel)

    def closed(self, link: AgentLink) -> None:
        """``link`` ended."""
        links = self._links.get(link.tunnel, [])
        if link in links:
            links.remove(link)
        if not links:
            self._links.pop(link.tunnel, None)

    def release(self, exchange: Exchange, cancel: str = "") -> None:
        """``exchange`` is over: cleanly (both sides whole), or cancelled for ``cancel``."""
        exchange.finish(cancel)
        self._wake(exchange.tunnel)

    async def claim(self, tunnel: str, wait: float) -> Exchange | None:
        """A new exchange with one of ``tunnel``'s agents; None if none is linked, or if
        every link stays full for ``wait`` s."""
        deadline = asyncio.get_running_loop().time() + wait
        while links := self._links.get(tunnel):
            start = next(self._turn)
            for offset in range(len(links)):  # round robin over the links that have room
                link = links[(start + offset) % len(links)]
                if link.mux.lanes < MAX_LANES and not link.mux.closed:
                    return Exchange(link, link.mux.open())
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return None
            freed = asyncio.get_running_loop().create_future()
            self._freed.setdefault(tunnel, collections.deque()).append(freed)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(freed, left)
        return None

    def _wake(self, tunnel: str) -> None:
        waiters = self._freed.pop(tunnel, None)
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)


class LinkEndpoint:
    """Accepts agents' links: checks the key with the control plane, then upgrades."""

    def __init__(self, registry: Registry, control: ControlPlane) -> None:
        self._registry = registry
        self._control = control

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path != mux.PATH:
            return web.json_response({"error": "not found"}, status=404)
        key = credentials.offered(request.headers.get("Authorization", "")).bearer
        if not key:
            return web.json_response({"error": "an agent key is required"}, status=401)
        try:
            tunnel = await self._control.authorize_link(
                key, request.headers.get(mux.TUNNEL_HEADER, "")
            )
        except RefusedError as exc:
            status = _STATUS.get(exc.code.name, 403)
            return web.json_response({"error": str(exc)[:200]}, status=status)
        except UnreachableError:
            return web.json_response({"error": "the control plane is unreachable"}, status=503)
        socket = web.WebSocketResponse(
            max_msg_size=mux.MAX_FRAME, heartbeat=mux.HEARTBEAT, compress=False
        )
        await socket.prepare(request)
        link = AgentLink(socket, tunnel, request.headers.get(mux.AGENT_HEADER, "")[:64])
        self._registry.opened(link)
        try:
            await link.mux.run()
        finally:
            self._registry.closed(link)
        return socket
