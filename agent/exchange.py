"""The reverse path: web requests from streaming proxies to the local HTTP service.

For each proxy the control plane names (``DesiredState.proxy_links``) the agent keeps
``spare`` Exchange calls open (ProxyLinkService), each waiting for one web request; as
soon as one is taken, another is opened, so a request never waits for a call to be set
up. A taken exchange becomes one local HTTP request to the tunnel's target, both bodies
streamed piece by piece as they come: nothing is buffered beyond gRPC's flow-control
window. When the proxy cancels the exchange (its web client went away, or a timeout),
the local request is dropped at once, which closes its connection: an abandoned LLM
generation stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp
import grpc
from tunnelplane.v1 import proxy_link_pb2, proxy_link_pb2_grpc

from agent import websocket
from agent.backoff import Backoff, BackoffPolicy

log = logging.getLogger("tunnelplane.agent.exchange")

Request = proxy_link_pb2.ExchangeRequest
Failure = proxy_link_pb2.LinkFailure
Call = grpc.aio.StreamStreamCall[proxy_link_pb2.ExchangeRequest, proxy_link_pb2.ExchangeResponse]
#: Largest response piece per message (gRPC's default message limit is 4 MiB).
PIECE = 256 * 1024
#: The link's channel: no BDP probing, so each exchange keeps gRPC's initial 64 KiB window
#: (probing grew windows to megabytes per stream, which a slow web client would then
#: hold in buffers, and measured no faster on loopback).
LINK_OPTIONS = (
    ("grpc.primary_user_agent", "tunnelplane-agent-link"),
    ("grpc.http2.bdp_probe", 0),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
)
#: Request fields the agent sets itself.
_REPLACED = frozenset({"host"})


@dataclass(frozen=True)
class LinkSettings:
    """How the agent reaches proxies."""

    tunnel: str
    agent_id: str
    key: str = field(repr=False)
    tls: bool = False
    root_certificates: bytes | None = field(default=None, repr=False)
    spare: int = 4
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)


def local_base(target_url: str) -> str | None:
    """The base URL of the local HTTP service, or None when the target is not HTTP."""
    parts = urlsplit(target_url if "://" in target_url else f"http://{target_url}")
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        return None
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


class ReversePath:
    """The links to every proxy for one tunnel; reconfigured by each desired state."""

    def __init__(self, settings: LinkSettings) -> None:
        self._settings = settings
        self._links: dict[str, _Link] = {}
        self._base: str | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def proxies(self) -> list[str]:
        """The proxies linked to now."""
        return sorted(self._links)

    def spare(self, proxy: str) -> int:
        """Exchanges open and waiting at ``proxy``."""
        link = self._links.get(proxy)
        return 0 if link is None else link.idle

    async def configure(self, proxies: Sequence[str], target_url: str) -> None:
        """Link to ``proxies`` (and only them) and carry requests to ``target_url``."""
        base = local_base(target_url) if target_url else None
        wanted = set(proxies) if base else set()
        self._base = base
        for address in set(self._links) - wanted:
            await self._links.pop(address).stop()
        if wanted and self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            )
        for address in wanted - set(self._links):
            link = _Link(address, self._settings, self._carry)
            self._links[address] = link
            link.start()

    async def stop(self) -> None:
        """Close every link; exchanges in flight are dropped."""
        await self.configure((), "")
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _carry(
        self, call: Call, head: proxy_link_pb2.HttpHead, body_ended: Callable[[], None]
    ) -> None:
        base, session = self._base, self._session
        if base is None or session is None:
            await _fail(call, Failure.CAUSE_UNAVAILABLE, "not carrying HTTP for this tunnel")
            return
        netloc = urlsplit(base).netloc
        headers = [(h.name, h.value.decode("latin-1")) for h in head.headers
                   if h.name.lower() not in _REPLACED]  # fmt: skip
        headers.append(("Host", netloc))
        if head.websocket:
            await call.read()  # the request's end: an upgrade has no body
            try:
                await websocket.carry(call, session, websocket.ws_url(base, head.target), headers)
            except aiohttp.ClientConnectorError as exc:
                await _fail(call, Failure.CAUSE_REFUSED, type(exc).__name__)
            return
        body = _body(call, body_ended) if head.has_body else None
        if body is None:
            await call.read()  # the request's end
            body_ended()
        try:
            async with session.request(
                head.method,
                base + head.target,
                headers=headers,
                data=body,
                allow_redirects=False,
                compress=None,
            ) as response:
                await call.write(Request(head=_response_head(response)))
                async for chunk in response.content.iter_any():
                    for offset in range(0, len(chunk), PIECE):
                        await call.write(Request(data=chunk[offset : offset + PIECE]))
                await call.write(Request(end=proxy_link_pb2.HttpEnd()))
        except aiohttp.ClientConnectorError as exc:
            await _fail(call, Failure.CAUSE_REFUSED, type(exc).__name__)
            return
        except (aiohttp.ClientError, ConnectionError) as exc:
            await _fail(call, Failure.CAUSE_RESET, type(exc).__name__)
            return
        await call.done_writing()


def _response_head(response: aiohttp.ClientResponse) -> proxy_link_pb2.HttpHead:
    headers = [proxy_link_pb2.HttpHeader(name=name.decode("latin-1"), value=value)
               for name, value in response.raw_headers]  # fmt: skip
    bodiless = response.status in {204, 304} or response.method == "HEAD"
    return proxy_link_pb2.HttpHead(status=response.status, headers=headers, has_body=not bodiless)


async def _body(call: Call, ended: Callable[[], None]) -> AsyncIterator[bytes]:
    while True:
        message = await call.read()
        if message is grpc.aio.EOF:
            raise ConnectionResetError("the proxy ended the request early")
        assert isinstance(message, proxy_link_pb2.ExchangeResponse)
        if message.HasField("end"):
            ended()
            return
        yield message.data


async def _fail(call: Call, cause: int, message: str) -> None:
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
        await call.write(Request(failure=Failure(cause=cause, message=message)))  # type: ignore[arg-type]
        await call.done_writing()


class _Link:
    """Exchanges with one proxy: keeps ``spare`` of them waiting, carries the taken ones."""

    def __init__(self, address: str, settings: LinkSettings, carry: _Carry) -> None:
        self.address = address
        self._settings = settings
        self._carry = carry
        self._backoff = Backoff(settings.backoff)
        self._channel = self._open_channel()
        self._stub = proxy_link_pb2_grpc.ProxyLinkServiceStub(self._channel)
        self._tasks: set[asyncio.Task[None]] = set()
        self._wanted = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None
        self.idle = 0

    def _open_channel(self) -> grpc.aio.Channel:
        options = LINK_OPTIONS
        if not self._settings.tls:
            return grpc.aio.insecure_channel(self.address, options=options)
        credentials = grpc.ssl_channel_credentials(self._settings.root_certificates)
        return grpc.aio.secure_channel(self.address, credentials, options=options)

    def start(self) -> None:
        self._keeper = asyncio.create_task(self._keep(), name=f"link {self.address}")

    async def stop(self) -> None:
        tasks = [t for t in (self._keeper, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._channel.close()

    async def _keep(self) -> None:
        """Open exchanges whenever fewer than ``spare`` wait; back off when they fail."""
        while True:
            while self.idle < self._settings.spare:
                self.idle += 1
                task = asyncio.create_task(self._exchange())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            self._wanted.clear()
            await self._wanted.wait()

    def _taken(self) -> None:
        self.idle -= 1
        self._wanted.set()

    async def _exchange(self) -> None:
        settings, waiting = self._settings, True
        call: Call = self._stub.Exchange(metadata=(("authorization", f"Bearer {settings.key}"),))
        try:
            hello = proxy_link_pb2.LinkHello(tunnel=settings.tunnel, agent_id=settings.agent_id)
            await call.write(Request(hello=hello))
            message = await call.read()
            waiting = False
            self._taken()
            if not isinstance(message, proxy_link_pb2.ExchangeResponse):
                return  # EOF: the proxy ended the call
            if not message.HasField("head"):
                return
            self._backoff.failures = 0
            await self._carry_cancellable(call, message.head)
            await call.code()  # the proxy has read everything and ended the call
        except grpc.aio.AioRpcError as exc:
            if waiting:
                await self._after_error(exc)
        finally:
            if waiting:
                self._taken()
            if not call.done():
                call.cancel()

    async def _carry_cancellable(self, call: Call, head: proxy_link_pb2.HttpHead) -> None:
        """Carry one request; drop it as soon as the proxy cancels the exchange.

        Once the request body has ended, a watcher keeps reading the call: the next thing
        the proxy sends is the end of the call, normal or cancelled (gRPC delivers a
        call's status only after its messages have been read, so someone must read).
        """
        task = asyncio.current_task()
        assert task is not None
        finished, watchers = False, []

        async def watch() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await call.read()
            if not finished:
                task.cancel()

        def body_ended() -> None:
            watchers.append(asyncio.create_task(watch()))

        try:
            await self._carry(call, head, body_ended)
        except asyncio.CancelledError:
            if call.done() and not finished:
                log.info("exchange cancelled by the proxy", extra={"target": head.target[:200]})
                return
            raise
        finally:
            # The watcher is left to end with the call: cancelling a pending read would
            # cancel the call, losing what the proxy has not read yet.
            finished = True

    async def _after_error(self, exc: grpc.aio.AioRpcError) -> None:
        delay = self._backoff.next_delay(0.0)
        log.warning(
            "proxy link failed",
            extra={"proxy": self.address, "code": exc.code().name, "details": exc.details(),
                   "retry_in": round(delay, 3)},
        )  # fmt: skip
        await asyncio.sleep(delay)


class _Carry(Protocol):  # ReversePath._carry's shape
    async def __call__(
        self, call: Call, head: proxy_link_pb2.HttpHead, body_ended: Callable[[], None]
    ) -> None: ...
