"""The reverse path: web requests from streaming proxies to the local HTTP service.

For each proxy the control plane names (``DesiredState.proxy_links``) the agent keeps one
link open: a WebSocket it dials out to the proxy's link port (``wss://`` with the proxy's
certificate verified when TLS is on), its agent key as a bearer credential. The proxy
opens a lane on that link for each web request (:mod:`tplink.mux`), and each lane becomes
one local HTTP request to the tunnel's target, both bodies streamed piece by piece as they
come: nothing is buffered beyond a lane's window. When the proxy resets a lane (its web
client went away, or a timeout), the local request is dropped at once, which closes its
connection: an abandoned LLM generation stops. A link that drops is dialled again with
back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp
from tunnelplane.v1 import proxy_link_pb2

from agent import websocket
from agent.backoff import Backoff, BackoffPolicy
from agent.counters import Counters
from tplink import mux

log = logging.getLogger("tunnelplane.agent.exchange")

Request = proxy_link_pb2.ExchangeRequest
Failure = proxy_link_pb2.LinkFailure
#: One exchange: the agent receives the proxy's messages and sends its own.
Lane = mux.Lane[proxy_link_pb2.ExchangeResponse, proxy_link_pb2.ExchangeRequest]
#: Largest response piece per message (a quarter of a lane's window).
PIECE = 256 * 1024
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
                read_bufsize=PIECE,
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

    async def _carry(self, lane: Lane, head: proxy_link_pb2.HttpHead) -> None:
        """Carry one request, counted."""
        tally = _Tally(started=asyncio.get_running_loop().time())
        self._counters.opened()
        try:
            await self._carry_request(lane, head, tally)
        finally:
            self._counters.bytes_in += tally.bytes_in
            self._counters.bytes_out += tally.bytes_out
            open_for = asyncio.get_running_loop().time() - tally.started
            self._counters.closed(
                ok=tally.ok, connect_seconds=tally.head_seconds, open_seconds=open_for
            )

    async def _carry_request(
        self, lane: Lane, head: proxy_link_pb2.HttpHead, tally: _Tally
    ) -> None:
        base, session = self._base, self._session
        if base is None or session is None:
            await _fail(lane, Failure.CAUSE_UNAVAILABLE, "not carrying HTTP for this tunnel")
            return
        netloc = urlsplit(base).netloc
        headers = [(h.name, h.value.decode("latin-1")) for h in head.headers
                   if h.name.lower() not in _REPLACED]  # fmt: skip
        headers.append(("Host", netloc))
        if head.websocket:
            try:
                await websocket.carry(lane, session, websocket.ws_url(base, head.target), headers)
                tally.ok = True
            except aiohttp.ClientConnectorError as exc:
                await _fail(lane, Failure.CAUSE_REFUSED, type(exc).__name__)
            return
        reader: asyncio.Task[None] | None = None
        body: AsyncIterator[bytes] | None = None
        if head.has_body:
            pieces: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(maxsize=1)
            reader = asyncio.create_task(_read_request(lane, pieces, tally))
            body = _body(pieces)
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
                await _send_response(lane, response, tally)
                tally.ok = response.status < 500
            if reader is not None:  # aiohttp stops at Content-Length: the end may be due
                await reader
        except aiohttp.ClientConnectorError as exc:
            await _fail(lane, Failure.CAUSE_REFUSED, type(exc).__name__)
        except mux.LaneClosedError:
            raise  # the proxy is gone: nobody to tell
        except (aiohttp.ClientError, ConnectionError) as exc:
            await _fail(lane, Failure.CAUSE_RESET, type(exc).__name__)
        finally:
            if reader is not None and not reader.done():
                reader.cancel()


async def _send_response(lane: Lane, response: aiohttp.ClientResponse, tally: _Tally) -> None:
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
    await lane.send(Request(head=reply))
    if reply.complete:
        return
    async for chunk in response.content.iter_any():
        tally.bytes_out += len(chunk)
        for piece in mux.pieces(chunk, PIECE):
            await lane.send_data(piece)
    await lane.send(Request(end=proxy_link_pb2.HttpEnd()))


def _response_head(response: aiohttp.ClientResponse) -> proxy_link_pb2.HttpHead:
    headers = [proxy_link_pb2.HttpHeader(name=name.decode("latin-1"), value=value)
               for name, value in response.raw_headers]  # fmt: skip
    bodiless = response.status in {204, 304} or response.method == "HEAD"
    return proxy_link_pb2.HttpHead(status=response.status, headers=headers, has_body=not bodiless)


async def _read_request(
    lane: Lane, pieces: asyncio.Queue[bytes | BaseException | None], tally: _Tally
) -> None:
    """The one reader of a request's body: its pieces into ``pieces`` (one at a time, so
    the lane's window holds the rest back), None at its end, or the error."""
    while (message := await lane.receive()) is not None:
        if isinstance(message, bytes):
            piece = message
        elif message.HasField("end"):
            await pieces.put(None)
            return
        else:
            piece = message.data
        tally.bytes_in += len(piece)
        await pieces.put(piece)
    failure = ConnectionResetError("the proxy ended the request early")
    with contextlib.suppress(asyncio.QueueFull):
        pieces.put_nowait(failure)
    raise failure


async def _body(pieces: asyncio.Queue[bytes | BaseException | None]) -> AsyncIterator[bytes]:
    while (piece := await pieces.get()) is not None:
        if isinstance(piece, BaseException):
            raise ConnectionResetError("the request body did not arrive whole") from piece
        yield piece


async def _fail(lane: Lane, cause: int, message: str) -> None:
    with contextlib.suppress(mux.LaneClosedError):
        await lane.send(Request(failure=Failure(cause=cause, message=message)))  # type: ignore[arg-type]


class _Link:
    """The link to one proxy: one WebSocket, dialled again with back-off whenever it
    drops; each lane the proxy opens on it is carried by a task of its own, which a reset
    of the lane cancels."""

    def __init__(self, address: str, settings: LinkSettings, carry: _Carry) -> None:
        self.address = address
        self._settings = settings
        self._carry = carry
        self._backoff = Backoff(settings.backoff)
        self._tasks: set[asyncio.Task[None]] = set()
        self._keeper: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        scheme = "wss" if self._settings.tls else "ws"
        return f"{scheme}://{self.address}{mux.PATH}"

    def _tls(self) -> ssl.SSLContext | bool:
        if not self._settings.tls:
            return True  # unused: ws:// has no TLS
        roots = self._settings.root_certificates
        return ssl.create_default_context(cadata=roots.decode("ascii") if roots else None)

    def start(self) -> None:
        self._keeper = asyncio.create_task(self._keep(), name=f"link {self.address}")

    async def stop(self) -> None:
        tasks = [t for t in (self._keeper, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _keep(self) -> None:
        """Dial, carry lanes until the link drops, dial again."""
        settings = self._settings
        headers = {"Authorization": f"Bearer {settings.key}", mux.TUNNEL_HEADER: settings.tunnel,
                   mux.AGENT_HEADER: settings.agent_id}  # fmt: skip
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                try:
                    socket = await session.ws_connect(
                        self.url, headers=headers, ssl=self._tls(), max_msg_size=mux.MAX_FRAME,
                        heartbeat=mux.HEARTBEAT, compress=0,
                    )  # fmt: skip
                except aiohttp.WSServerHandshakeError as exc:
                    await self._after_error(f"refused with {exc.status}")
                    continue
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    await self._after_error(type(exc).__name__)
                    continue
                self._backoff.failures = 0
                link: mux.Link[proxy_link_pb2.ExchangeResponse, Request] = mux.Link(
                    socket, proxy_link_pb2.ExchangeResponse, self._lane
                )
                try:
                    await link.run()
                finally:
                    await socket.close()
                await self._after_error(link.closed)

    def _lane(self, lane: Lane) -> None:
        task = asyncio.create_task(self._carry_lane(lane))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        lane.on_reset = lambda _: _cancel(task)

    async def _carry_lane(self, lane: Lane) -> None:
        """One request: carried, then the lane is finished (or reset if carrying broke)."""
        first = await lane.receive()
        if first is None or isinstance(first, bytes) or not first.HasField("head"):
            lane.reset("a lane must begin with a request head")
            return
        try:
            await self._carry(lane, first.head)
        except asyncio.CancelledError:
            if lane.over:  # reset by the proxy: the local request is dropped
                dropped = {"target": first.head.target[:200], "reason": lane.reason}
                log.info("exchange cancelled by the proxy", extra=dropped)
                return
            raise
        except mux.LaneClosedError:
            return
        except Exception:
            log.exception("carrying a request failed")
            lane.reset("the agent failed to carry the request")
            return
        lane.finish()

    async def _after_error(self, reason: str) -> None:
        delay = self._backoff.next_delay(0.0)
        down = {"proxy": self.address, "reason": reason, "retry_in": round(delay, 3)}
        log.warning("proxy link down", extra=down)
        await asyncio.sleep(delay)


def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()


class _Carry(Protocol):  # ReversePath._carry's shape
    async def __call__(self, lane: Lane, head: proxy_link_pb2.HttpHead) -> None: ...
