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
from agent.counters import Counters

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
    # Exchanges wait for the link to be up (wait_for_ready): a proxy that restarts is
    # linked to again within 5 s of being back.
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5_000),
)
#: Responses with a Content-Length up to this travel whole in the head's message.
INLINE = 64 * 1024
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


@dataclass
class _Tally:
    """One request as the agent's reports count it (like one connection of a TCP tunnel)."""

    started: float
    head_seconds: float | None = None  # until the local service's response head
    ok: bool = False  # answered below 500, and carried whole
    bytes_in: int = 0
    bytes_out: int = 0


class ReversePath:
    """The links to every proxy for one tunnel; reconfigured by each desired state.

    Each request carried counts in ``counters`` as one connection of a TCP tunnel does:
    opened when it starts, its latency the time to the local service's response head,
    its bytes both ways, its outcome when it ends (once, whatever its length)."""

    def __init__(self, settings: LinkSettings, counters: Counters | None = None) -> None:
        self._settings = settings
        self._counters = Counters() if counters is None else counters
        self._links: dict[str, _Link] = {}
        self._base: str | None = None
        self._session: aiohttp.ClientSession | None = None

    def spare(self, proxy: str) -> int:
        """Exchanges open and waiting at ``proxy``."""
        link = self._links.get(proxy)
        return 0 if link is None else link.idle

    async def configure(self, proxies: Sequence[str], target_url: str) -> None:
        """Link to ``proxies`` (and only them) and carry requests to ``target_url``."""
        # A state that names no target (the endpoint's probes failed, say) keeps the last.
        base = local_base(target_url) if target_url else self._base
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
    ) -> bool:
        """Carry one request, counted; whether the exchange may take the next one."""
        tally = _Tally(started=asyncio.get_running_loop().time())
        self._counters.opened()
        try:
            return await self._carry_request(call, head, body_ended, tally)
        finally:
            self._counters.bytes_in += tally.bytes_in
            self._counters.bytes_out += tally.bytes_out
            open_for = asyncio.get_running_loop().time() - tally.started
            self._counters.closed(
                ok=tally.ok, connect_seconds=tally.head_seconds, open_seconds=open_for
            )

    async def _carry_request(
        self,
        call: Call,
        head: proxy_link_pb2.HttpHead,
        body_ended: Callable[[], None],
        tally: _Tally,
    ) -> bool:
        base, session = self._base, self._session
        if base is None or session is None:
            await _fail(call, Failure.CAUSE_UNAVAILABLE, "not carrying HTTP for this tunnel")
            return False
        netloc = urlsplit(base).netloc
        headers = [(h.name, h.value.decode("latin-1")) for h in head.headers
                   if h.name.lower() not in _REPLACED]  # fmt: skip
        headers.append(("Host", netloc))
        if head.websocket:
            try:
                await websocket.carry(call, session, websocket.ws_url(base, head.target), headers)
                tally.ok = True
            except aiohttp.ClientConnectorError as exc:
                await _fail(call, Failure.CAUSE_REFUSED, type(exc).__name__)
            return False
        reader: asyncio.Task[None] | None = None
        body: AsyncIterator[bytes] | None = None
        if head.has_body:
            pieces: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(maxsize=1)
            reader = asyncio.create_task(_read_request(call, pieces, body_ended, tally))
            body = _body(pieces)
        else:
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
                tally.head_seconds = asyncio.get_running_loop().time() - tally.started
                await _send_response(call, response, tally)
                tally.ok = response.status < 500
            if reader is not None:  # aiohttp stops at Content-Length: the end may be due
                await reader
        except aiohttp.ClientConnectorError as exc:
            await _fail(call, Failure.CAUSE_REFUSED, type(exc).__name__)
            return False
        except (aiohttp.ClientError, ConnectionError) as exc:
            await _fail(call, Failure.CAUSE_RESET, type(exc).__name__)
            return False
        finally:
            if reader is not None and not reader.done():
                reader.cancel()  # the exchange is over: cancelling its read cancels it
        return True


async def _send_response(call: Call, response: aiohttp.ClientResponse, tally: _Tally) -> None:
    """The local service's response to the proxy: one message when it is small and whole,
    else the head at once and each piece of the body as it comes."""
    reply = _response_head(response)
    length = response.content_length
    if reply.has_body and length is not None and length <= INLINE:
        reply.body = await response.read()
        reply.complete = True
        tally.bytes_out += len(reply.body)
    elif not reply.has_body:
        reply.complete = True
    await call.write(Request(head=reply))
    if reply.complete:
        return
    async for chunk in response.content.iter_any():
        tally.bytes_out += len(chunk)
        for offset in range(0, len(chunk), PIECE):
            await call.write(Request(data=chunk[offset : offset + PIECE]))
    await call.write(Request(end=proxy_link_pb2.HttpEnd()))


def _response_head(response: aiohttp.ClientResponse) -> proxy_link_pb2.HttpHead:
    headers = [proxy_link_pb2.HttpHeader(name=name.decode("latin-1"), value=value)
               for name, value in response.raw_headers]  # fmt: skip
    bodiless = response.status in {204, 304} or response.method == "HEAD"
    return proxy_link_pb2.HttpHead(status=response.status, headers=headers, has_body=not bodiless)


async def _read_request(
    call: Call,
    pieces: asyncio.Queue[bytes | BaseException | None],
    ended: Callable[[], None],
    tally: _Tally,
) -> None:
    """The one reader of a request's body: its pieces into ``pieces`` (one at a time, so
    the exchange's window holds the rest back), None at its end, or the error."""
    try:
        while isinstance(message := await call.read(), proxy_link_pb2.ExchangeResponse):
            if message.HasField("end"):
                await pieces.put(None)
                ended()
                return
            tally.bytes_in += len(message.data)
            await pieces.put(message.data)
        failure: BaseException = ConnectionResetError("the proxy ended the request early")
    except grpc.aio.AioRpcError as exc:
        failure = exc
    with contextlib.suppress(asyncio.QueueFull):
        pieces.put_nowait(failure)
    raise failure


async def _body(pieces: asyncio.Queue[bytes | BaseException | None]) -> AsyncIterator[bytes]:
    while (piece := await pieces.get()) is not None:
        if isinstance(piece, BaseException):
            raise ConnectionResetError("the request body did not arrive whole") from piece
        yield piece


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
        """One lane: wait for a request, carry it, wait for the next, until the lane ends
        (the proxy cancelled a request or went away, or the link was stopped)."""
        settings, idle, used = self._settings, True, False
        metadata = (("authorization", f"Bearer {settings.key}"),)
        call: Call = self._stub.Exchange(metadata=metadata, wait_for_ready=True)
        try:
            hello = proxy_link_pb2.LinkHello(tunnel=settings.tunnel, agent_id=settings.agent_id)
            await call.write(Request(hello=hello))
            message = await call.read()
            while isinstance(message, proxy_link_pb2.ExchangeResponse) and message.HasField("head"):
                idle, used = False, True
                self._taken()
                self._backoff.failures = 0
                upcoming = await self._carry_cancellable(call, message.head)
                if upcoming is None:
                    return
                idle = True
                self.idle += 1
                message = await upcoming
        except grpc.aio.AioRpcError as exc:
            if not used:
                await self._after_error(exc)
        except asyncio.InvalidStateError:
            pass  # the proxy ended the exchange while the response was being written
        finally:
            if idle:
                self._taken()
            if not call.done():
                call.cancel()

    async def _carry_cancellable(
        self, call: Call, head: proxy_link_pb2.HttpHead
    ) -> asyncio.Task[object] | None:
        """Carry one request, dropping it as soon as the proxy cancels the exchange; the
        read of the lane's next message, or None when the lane is over.

        Once the request has been read whole, the next read begins at once: what comes is
        the next request once this one is answered, or, earlier, the end of the call
        (cancelled: gRPC delivers a call's status only to someone reading it).
        """
        task = asyncio.current_task()
        assert task is not None
        upcoming: list[asyncio.Task[object]] = []
        carrying = True

        def body_ended() -> None:
            read = asyncio.create_task(call.read())
            read.add_done_callback(lambda _: task.cancel() if carrying else None)
            upcoming.append(read)

        try:
            reusable = await self._carry(call, head, body_ended)
        except asyncio.CancelledError:
            if upcoming and upcoming[0].done():
                log.info("exchange cancelled by the proxy", extra={"target": head.target[:200]})
                return None
            raise
        finally:
            carrying = False  # from here on, the next read's end is the lane's business
        # A lane that is over keeps its read: cancelling a pending read cancels the call,
        # which would lose what the proxy has not read yet.
        return upcoming[0] if upcoming and reusable else None

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
    ) -> bool: ...
