"""Agents' exchanges: the link side of the proxy (ProxyLinkService, served on the link port).

An agent keeps a few Exchange calls open per tunnel, each waiting for a web request (its
``hello`` says for which tunnel; the agent key in its metadata is checked with the
control plane). :class:`Registry` holds the waiting ones per tunnel and hands one to each
web request; the web side then writes the request and reads the response on that call
directly, and :meth:`Exchange.finish` ends the call — normally, or cancelled, which the
agent sees at once and turns into dropping the local request.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Iterable

import grpc
from tunnelplane.v1 import proxy_link_pb2, proxy_link_pb2_grpc

from proxy.control import ControlPlane, RefusedError, UnreachableError

log = logging.getLogger("tunnelplane.proxy.links")

Request = proxy_link_pb2.ExchangeRequest
Response = proxy_link_pb2.ExchangeResponse
Context = grpc.aio.ServicerContext[Request, Response]


class Exchange:
    """One agent's call, parked until a web request takes it."""

    def __init__(self, context: Context, tunnel: str, agent_id: str) -> None:
        self._context = context
        self.tunnel = tunnel
        self.agent_id = agent_id
        self._outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    @property
    def finished(self) -> bool:
        """Whether the exchange is over (taken and done, or its call ended)."""
        return self._outcome.done()

    async def send(self, message: Response) -> None:
        """Write to the agent (waits while the stream's flow-control window is full)."""
        await self._context.write(message)

    async def receive(self) -> Request | None:
        """The agent's next message; None when the agent ended the call."""
        message = await self._context.read()
        return message if isinstance(message, Request) else None  # else EOF

    def finish(self, cancel: str = "") -> None:
        """End the call: normally, or cancelled with ``cancel`` as the reason."""
        if not self._outcome.done():
            self._outcome.set_result(cancel)

    async def outcome(self) -> str:
        """Wait until :meth:`finish`; the cancel reason, if any."""
        return await self._outcome


class Registry:
    """Agents' waiting exchanges per tunnel, and how many calls each tunnel has open."""

    def __init__(self) -> None:
        self._spare: dict[str, collections.deque[Exchange]] = {}
        self._waiters: dict[str, collections.deque[asyncio.Future[Exchange]]] = {}
        self._open: collections.Counter[str] = collections.Counter()

    def linked(self, tunnel: str) -> bool:
        """Whether any agent has an exchange open for ``tunnel`` (waiting or busy)."""
        return self._open[tunnel] > 0

    def tunnels(self) -> list[str]:
        """The tunnels agents hold lanes for here."""
        return list(self._open)

    def spare(self, tunnel: str) -> int:
        """Exchanges waiting for a request."""
        return len(self._spare.get(tunnel, ()))

    def spare_total(self) -> int:
        """Exchanges waiting, all tunnels."""
        return sum(len(spare) for spare in self._spare.values())

    def release(self, exchange: Exchange) -> None:
        """A request on ``exchange`` is over and both sides are whole: the next may come."""
        if not exchange.finished:
            self._offer(exchange)

    def opened(self, exchange: Exchange) -> None:
        """An agent opened ``exchange``: give it to a waiting request, or keep it."""
        self._open[exchange.tunnel] += 1
        self._offer(exchange)

    def closed(self, exchange: Exchange) -> None:
        """``exchange``'s call ended."""
        self._open[exchange.tunnel] -= 1
        if self._open[exchange.tunnel] <= 0:
            del self._open[exchange.tunnel]
        spare = self._spare.get(exchange.tunnel)
        if spare is not None and exchange in spare:
            spare.remove(exchange)
            if not spare:
                del self._spare[exchange.tunnel]

    async def claim(self, tunnel: str, wait: float) -> Exchange | None:
        """A waiting exchange of ``tunnel``, waiting up to ``wait`` s for one; None if none."""
        spare = self._spare.get(tunnel)
        while spare:
            exchange = spare.popleft()
            if not spare:
                del self._spare[tunnel]
            if not exchange.finished:
                return exchange
            spare = self._spare.get(tunnel)
        if not self.linked(tunnel):
            return None
        future: asyncio.Future[Exchange] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(tunnel, collections.deque())
        waiters.append(future)
        try:
            return await asyncio.wait_for(future, wait)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if future.done() and not future.cancelled():
                self._offer(future.result())  # handed over just as the claimer gave up
            if isinstance(exc, asyncio.CancelledError):
                raise
            return None
        finally:
            if future in waiters:
                waiters.remove(future)
            if not waiters and self._waiters.get(tunnel) is waiters:
                del self._waiters[tunnel]

    def _offer(self, exchange: Exchange) -> None:
        waiters = self._waiters.get(exchange.tunnel)
        while waiters:
            future = waiters.popleft()
            if not future.done():
                future.set_result(exchange)
                return
        # Last in, first out: the lane used last is the warmest, and the others can idle.
        self._spare.setdefault(exchange.tunnel, collections.deque()).appendleft(exchange)


def bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The bearer credential in ``authorization`` metadata, or ""."""
    for name, value in metadata or ():
        if name == "authorization" and isinstance(value, str):
            scheme, _, credential = value.partition(" ")
            return credential.strip() if scheme.lower() == "bearer" else ""
    return ""


class LinkService(proxy_link_pb2_grpc.ProxyLinkServiceServicer):
    """Authenticates each exchange an agent opens and parks it in the registry."""

    def __init__(self, registry: Registry, control: ControlPlane) -> None:
        self._registry = registry
        self._control = control

    async def Exchange(  # type: ignore[override]  # noqa: N802 - writes through the context
        self,
        request_iterator: AsyncIterator[Request],  # noqa: ARG002 - read through the context
        context: Context,
    ) -> None:
        first = await context.read()
        if not isinstance(first, Request) or not first.HasField("hello"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "send hello first")
        hello = first.hello
        key = bearer(context.invocation_metadata())
        if not key:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "an agent key is required")
        try:
            tunnel = await self._control.authorize_link(key, hello.tunnel)
        except RefusedError as exc:
            await context.abort(exc.code, str(exc))
        except UnreachableError:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the control plane is unreachable")
        exchange = Exchange(context, tunnel, hello.agent_id[:64])
        self._registry.opened(exchange)
        try:
            cancel = await exchange.outcome()
        finally:
            exchange.finish()
            self._registry.closed(exchange)
        if cancel:
            await context.abort(grpc.StatusCode.CANCELLED, cancel)
