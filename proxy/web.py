"""The public side: web requests in, through an agent's exchange, and the response back.

Per request: route it (:mod:`proxy.routing`), ask the control plane whether it may go in
(cached), open an exchange on the agent's link, send the head and stream the body
while the response comes back; every piece of the response is written to the client as
soon as it arrives, whatever its content type. Timeouts are idle timeouts: the first
body byte (or the end of an empty response) has ``first_byte_timeout`` from the
request's arrival; after that, ``idle_timeout`` is the longest silence allowed. A client
that goes away cancels the exchange (aiohttp cancels this handler), and the agent drops
the local request. Failures before the response starts are JSON answers (502, 503,
504); after it started, the connection is closed without the final chunk, so the client
sees a truncated response rather than a complete-looking one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass

import aiohttp
import grpc
from aiohttp import web
from tunnelplane.v1 import proxies_pb2, proxy_link_pb2

from proxy import credentials, fields, peers, replies, websocket
from proxy.control import Access, ControlPlane, RefusedError, UnreachableError
from proxy.encoding import Gzip, gzip_for
from proxy.limits import Admission
from proxy.links import Exchange, Registry
from proxy.metrics import ProxyMetrics
from proxy.replies import Refusal
from proxy.routing import Route, route
from tplink.mux import LaneClosedError, pieces

log = logging.getLogger("tunnelplane.proxy.web")

Response = proxy_link_pb2.ExchangeResponse
Failure = proxy_link_pb2.LinkFailure
Decision = proxies_pb2.TunnelAccessDecision
#: Largest piece of a request body per message (a quarter of a lane's window).
PIECE = 256 * 1024
#: How long a request body may go on being sent once the response is whole.
PUMP_GRACE = 1.0
#: Per-request key: whether it came through a hop from another instance.
HOPPED = web.RequestKey("tp_hopped", bool)

_REFUSALS = {
    Decision.REFUSAL_NOT_FOUND: replies.NOT_ROUTED,
    Decision.REFUSAL_UNAUTHENTICATED: Refusal(
        401,
        "UNAUTHENTICATED",
        "this tunnel is private: send an access token or an API key "
        "with the scope tunnels.use as 'Authorization: Bearer …'",
        WWW_Authenticate='Bearer realm="tunnelplane"',
    ),
    Decision.REFUSAL_FORBIDDEN: Refusal(403, "FORBIDDEN", "this client may not use this tunnel"),
    Decision.REFUSAL_NOT_RUNNING: Refusal(
        503, "TUNNEL_NOT_RUNNING", "the tunnel is not started", Retry_After="5"
    ),
}
_FAILURES = {
    Failure.CAUSE_REFUSED: (502, "UPSTREAM_REFUSED", "the local service refused the connection"),
    Failure.CAUSE_RESET: (502, "UPSTREAM_RESET", "the local service closed the connection"),
    Failure.CAUSE_TIMEOUT: (504, "UPSTREAM_TIMEOUT", "the local service did not answer in time"),
    Failure.CAUSE_UNAVAILABLE: (503, "NO_AGENT", "the agent is not carrying this tunnel now"),
}


def _refusal(access: Access, tunnel_id: str) -> Refusal:
    """The answer to a refused request: for a tunnel with basic access that got no (right)
    credentials, a challenge that makes a browser ask for them."""
    if access.basic and access.refusal == Decision.REFUSAL_UNAUTHENTICATED:
        return Refusal(
            401,
            "UNAUTHENTICATED",
            "this tunnel asks for its user name and password (HTTP Basic)",
            WWW_Authenticate=f'Basic realm="{tunnel_id}", charset="UTF-8"',
        )
    return _REFUSALS.get(access.refusal, replies.NOT_ROUTED)


@dataclass(frozen=True, slots=True)
class WebSettings:
    """The public side's limits."""

    public_domain: str = "localhost"
    first_byte_timeout: float = 300.0
    idle_timeout: float = 30.0
    max_body_bytes: int = 1 << 30
    #: How long a request waits for an exchange when every one of the agent's is busy.
    claim_wait: float = 10.0
    #: Serve only this user's tunnels ("": anyone's, as the shared embedded proxy does).
    owner: str = ""
    #: Requests carried at once (0: no limit); more get 503.
    max_connections: int = 0
    #: Requests a second with a burst above it (0: no limit); more get 429.
    rate_limit_rps: float = 0.0
    rate_limit_burst: int = 0
    #: gzip level of compressible responses (0: off).
    gzip_level: int = 0


def _wants_websocket(request: web.BaseRequest) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket" and request.method == "GET"


def _body_piece(message: proxy_link_pb2.ExchangeRequest | bytes) -> bytes | None:
    """A piece of the response body, or None at its end."""
    if isinstance(message, bytes):
        return message
    return None if message.HasField("end") else message.data


class _TruncatedError(Exception):
    """The response started and cannot be completed."""


class WebProxy:
    """The aiohttp handler of every public request."""

    def __init__(
        self,
        settings: WebSettings,
        registry: Registry,
        control: ControlPlane,
        metrics: ProxyMetrics,
        *,
        shared: peers.Peers | None = None,
        hop_token: str = "",
    ) -> None:
        #: The instances' shared registry, to relay a request whose agent has no lane here.
        self._peers = shared
        self._hop_token = hop_token
        self._session: aiohttp.ClientSession | None = None
        self._registry = registry
        self._control = control
        self._metrics = metrics
        self._admission = Admission(0, 0, 0)
        self.configure(settings)
        #: When the last request for a tunnel arrived (wall clock; 0: none yet).
        self.last_request = 0.0

    @property
    def active(self) -> int:
        """Requests being carried now."""
        return self._admission.active

    @property
    def settings(self) -> WebSettings:
        """The settings in effect."""
        return self._settings

    def configure(self, settings: WebSettings) -> None:
        """Use ``settings`` from the next request on (a config pushed live)."""
        active = self._admission.active
        self._settings = settings
        self._admission = Admission(
            settings.max_connections, settings.rate_limit_rps, settings.rate_limit_burst
        )
        self._admission.active = active

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Carry ``request`` to its tunnel's local service, or answer why not."""
        started = time.monotonic()
        found = route(request.host, request.raw_path, self._settings.public_domain)
        if found is None:
            return self._own(request)
        self.last_request = time.time()
        request[peers.CLIENT_KEY], request[HOPPED] = peers.client_ip(request, self._hop_token)
        admission = self._admission
        if (limited := admission.refusal()) is not None:
            status, reason, wait = limited
            self._metrics.finished(status, reason, started, time.monotonic())
            message = "too many requests" if status == 429 else "too many requests at once"
            after = str(max(1, math.ceil(wait)))
            return replies.reply(Refusal(status, reason, message, Retry_After=after))
        self._metrics.active.inc()
        status, outcome = 0, "ok"
        try:
            response = await self._forward(request, found, started)
        except Refusal as refusal:
            status, outcome = refusal.status, refusal.reason
            return replies.reply(refusal)
        except _TruncatedError as exc:
            status, outcome = 502, str(exc)
            raise
        except asyncio.CancelledError:
            status, outcome = 499, "CLIENT_GONE"
            raise
        else:
            status = response.status
            return response
        finally:
            admission.done()
            self._metrics.active.dec()
            self._metrics.finished(status, outcome, started, time.monotonic())

    def _own(self, request: web.BaseRequest) -> web.Response:
        if request.path == "/_proxy/health":
            return web.json_response({"status": "SERVING"})
        return replies.reply(replies.NOT_ROUTED)

    async def _admit(self, request: web.BaseRequest, tunnel_id: str) -> tuple[str, bool]:
        """The tunnel's name, and whether the ``Authorization`` header was for the proxy (to
        strip): a Tunnelplane credential, or the basic credentials of a tunnel that takes
        them (any other tunnel's local service gets its own Basic credentials)."""
        offered = credentials.offered(request.headers.get("Authorization", ""))
        client_ip = request.get(peers.CLIENT_KEY, request.remote or "")
        try:
            access = await self._control.check_access(tunnel_id, offered, client_ip)
        except UnreachableError as exc:
            raise Refusal(
                503, "CONTROL_PLANE_UNAVAILABLE", "cannot check access now", Retry_After="1"
            ) from exc
        except RefusedError as exc:
            if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise Refusal(429, "RATE_LIMITED", "too many requests", Retry_After="1") from exc
            if exc.code == grpc.StatusCode.UNAUTHENTICATED:
                raise Refusal(401, "INVALID_CREDENTIAL", "the credential is not valid") from exc
            raise Refusal(403, "FORBIDDEN", "this client may not use this tunnel") from exc
        if not access.allowed:
            raise _refusal(access, tunnel_id)
        owner = self._settings.owner
        if owner and not access.tunnel.startswith(f"users/{owner}/"):
            raise replies.NOT_ROUTED  # another user's proxy: their tunnels are not here
        return access.tunnel, bool(offered.bearer) or access.basic

    async def _forward(
        self, request: web.BaseRequest, found: Route, started: float
    ) -> web.StreamResponse:
        length = request.content_length
        if length is not None and length > self._settings.max_body_bytes:
            raise Refusal(413, "BODY_TOO_LARGE", "the request body is too large")
        tunnel, strip_credential = await self._admit(request, found.tunnel_id)
        if self._peers is not None and not self._registry.linked(tunnel):
            relayed = await self._relay(request, tunnel)
            if relayed is not None:
                return relayed
        exchange = await self._registry.claim(tunnel, self._settings.claim_wait)
        if exchange is None:
            raise Refusal(503, "NO_AGENT", "no agent is connected for this tunnel",
                          Retry_After="5")  # fmt: skip
        cancel, clean = "the web client went away", False
        try:
            response, clean = await self._carry(request, found, exchange, started, strip_credential)
        except Refusal as refusal:
            cancel = refusal.reason
            raise
        else:
            return response
        finally:  # cleanly when both messages were whole, else the agent drops its side
            self._registry.release(exchange, "" if clean else cancel)

    async def _relay(self, request: web.BaseRequest, tunnel: str) -> web.StreamResponse | None:
        """The answer of another instance that holds the tunnel's agent, if one does (a
        request that came through a hop, or an upgrade, is not relayed again)."""
        if request[HOPPED] or _wants_websocket(request) or self._peers is None:
            return None
        for base_url in await self._peers.holders(tunnel):
            try:
                return await peers.relay(
                    request, base_url, self._hop_token, self._http(),
                    self._settings.first_byte_timeout,
                )  # fmt: skip
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                if request.get(peers.STARTED):
                    raise
                log.warning("a peer did not take a relayed request",
                            extra={"peer": base_url, "error": type(exc).__name__})  # fmt: skip
        return None

    def join(self, shared: peers.Peers) -> None:
        """Relay through ``shared`` from now on (the registry is known once bound)."""
        self._peers = shared

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(auto_decompress=False)
        return self._session

    async def close(self) -> None:
        """Let go of the pool of connections to peers."""
        if self._session is not None:
            await self._session.close()

    def _head(
        self, request: web.BaseRequest, found: Route, strip_credential: bool
    ) -> proxy_link_pb2.HttpHead:
        upgrade = _wants_websocket(request)
        drop = fields.FORWARDED | ({"authorization"} if strip_credential else frozenset())
        if upgrade:
            drop |= websocket.HANDSHAKE
        pairs = fields.end_to_end(request.headers.items(), drop=frozenset(drop))
        pairs += [
            ("X-Forwarded-For", request.get(peers.CLIENT_KEY, request.remote or "")),
            ("X-Forwarded-Proto", request.scheme),
            ("X-Forwarded-Host", request.host),
        ]
        has_body = request.body_exists and not upgrade
        return proxy_link_pb2.HttpHead(
            method=request.method,
            target=found.target,
            headers=fields.to_proto(pairs),
            has_body=has_body,
            complete=not has_body,
            websocket=upgrade,
        )

    async def _carry(
        self,
        request: web.BaseRequest,
        found: Route,
        exchange: Exchange,
        started: float,
        strip_credential: bool,
    ) -> tuple[web.StreamResponse, bool]:
        """The response, and whether the exchange ended cleanly (the request went out
        whole and the response came back whole), so the agent need not be told to drop it."""
        head = self._head(request, found, strip_credential)
        try:
            await exchange.send(Response(head=head))
        except LaneClosedError:
            raise Refusal(502, "AGENT_GONE", "the agent's link closed") from None
        prepared: list[bool] = []  # set once the response's head went to the client
        if not head.has_body:
            return await self._respond(request, exchange, started, prepared), True
        pump = asyncio.create_task(self._pump(request, exchange))
        respond = asyncio.create_task(self._respond(request, exchange, started, prepared))
        failure: Exception | None = None
        try:
            await asyncio.wait({pump, respond}, return_when=asyncio.FIRST_COMPLETED)
            failed = pump.done() and not pump.cancelled() and pump.exception() is not None
            if failed and not respond.done():  # too large, or the upload broke off
                respond.cancel()
                await asyncio.gather(respond, return_exceptions=True)
                failure = self._body_failure(request, pump.exception(), prepared)
            else:
                response = await respond
        except BaseException:
            for task in (pump, respond):
                task.cancel()
            await asyncio.gather(pump, respond, return_exceptions=True)
            raise
        if failure is not None:
            raise failure
        if not pump.done():
            # The agent may answer before it has read the request's end (aiohttp stops at
            # Content-Length): let the pump finish, briefly. Cancelling a pending write
            # would cancel the exchange.
            await asyncio.wait([pump], timeout=PUMP_GRACE)
            if not pump.done():
                pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)
        sent = not pump.cancelled() and pump.exception() is None
        return response, sent and not isinstance(response, web.WebSocketResponse)

    def _body_failure(
        self, request: web.BaseRequest, cause: BaseException | None, prepared: list[bool]
    ) -> Exception:
        """What to raise when the request body failed before the response ended."""
        if prepared:  # the response started: too late for an answer of our own
            self._truncate(request, Refusal(502, "BODY_FAILED", "the request body failed"))
            return _TruncatedError("BODY_FAILED")
        if isinstance(cause, Refusal):
            return cause
        return Refusal(400, "BODY_INCOMPLETE", "the request body did not arrive whole")

    async def _pump(self, request: web.BaseRequest, exchange: Exchange) -> None:
        sent, limit = 0, self._settings.max_body_bytes
        async for chunk in request.content.iter_any():
            sent += len(chunk)
            if sent > limit:
                raise Refusal(413, "BODY_TOO_LARGE", "the request body is too large")
            for piece in pieces(chunk, PIECE):
                await exchange.send_data(piece)
        self._metrics.bytes.labels("in").inc(sent)
        await exchange.send(Response(end=proxy_link_pb2.HttpEnd()))

    async def _next(
        self, exchange: Exchange, within: float, what: str
    ) -> proxy_link_pb2.ExchangeRequest | bytes:
        """The agent's next message or piece of body, within ``within`` s."""
        try:
            async with asyncio.timeout(max(within, 0.0)):
                message = await exchange.receive()
        except TimeoutError:
            raise Refusal(504, what, "the local service did not answer in time") from None
        if message is None:
            log.info("the exchange ended early", extra={"lane": exchange.reason})
            raise Refusal(502, "AGENT_GONE", "the agent's link closed during the request")
        if isinstance(message, bytes):
            return message
        if message.HasField("failure"):
            status, reason, text = _FAILURES.get(
                message.failure.cause, (502, "UPSTREAM_FAILED", "the local service failed")
            )
            raise Refusal(status, reason, text)
        return message

    async def _respond(
        self, request: web.BaseRequest, exchange: Exchange, started: float, prepared: list[bool]
    ) -> web.StreamResponse:
        settings = self._settings
        first_byte_by = started + settings.first_byte_timeout
        first = await self._next(exchange, first_byte_by - time.monotonic(), "FIRST_BYTE_TIMEOUT")
        if isinstance(first, bytes) or not first.HasField("head"):
            raise Refusal(502, "AGENT_PROTOCOL", "the agent sent no valid response head")
        if not 100 <= first.head.status <= 599:
            raise Refusal(502, "AGENT_PROTOCOL", "the agent sent no valid response head")
        if first.head.status == 101:
            if not _wants_websocket(request):
                raise Refusal(502, "AGENT_PROTOCOL", "an upgrade nobody asked for")
            prepared.append(True)
            return await websocket.bridge(request, exchange, first.head)
        head = first.head
        response, gzip = self._response(request, head)
        await response.prepare(request)
        prepared.append(True)
        out, flowing = len(head.body), bool(head.body or head.complete)
        if flowing:
            self._metrics.first_byte.observe(time.monotonic() - started)
            await response.write(gzip.piece(head.body) if gzip else head.body)
        while not head.complete:
            try:
                if flowing:
                    message = await self._next(exchange, settings.idle_timeout, "IDLE_TIMEOUT")
                else:
                    budget = first_byte_by - time.monotonic()
                    message = await self._next(exchange, budget, "FIRST_BYTE_TIMEOUT")
            except Refusal as refusal:
                self._truncate(request, refusal)
                raise _TruncatedError(refusal.reason) from refusal
            piece = _body_piece(message)
            if piece is None:
                break
            if not flowing:
                flowing = True
                self._metrics.first_byte.observe(time.monotonic() - started)
            out += len(piece)
            await response.write(gzip.piece(piece) if gzip else piece)
        self._metrics.bytes.labels("out").inc(out)
        await response.write_eof(gzip.finish() if gzip else b"")
        return response

    def _response(
        self, request: web.BaseRequest, head: proxy_link_pb2.HttpHead
    ) -> tuple[web.StreamResponse, Gzip | None]:
        """The response to ``head``, gzipped when the config and the client allow it."""
        response = web.StreamResponse(status=head.status)
        for name, value in fields.end_to_end(fields.from_proto(head.headers)):
            response.headers.add(name, value)
        gzip = gzip_for(self._settings.gzip_level, request.headers, response.headers)
        if gzip is not None:
            response.headers.popall("Content-Length", None)
            response.headers["Content-Encoding"] = "gzip"
            response.headers.add("Vary", "Accept-Encoding")
        elif head.complete and response.content_length is None:
            response.content_length = len(head.body)
        return response, gzip

    def _truncate(self, request: web.BaseRequest, refusal: Refusal) -> None:
        log.info("response cut short", extra={"reason": refusal.reason})
        if request.transport is not None:
            request.transport.close()
