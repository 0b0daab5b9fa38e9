"""The agent's session with the control plane: one ``AgentService.Connect`` stream at a time.

The session says hello, waits for welcome, then sends heartbeats and reports while it
applies every desired state the control plane sends. When the stream fails it reconnects
with back-off; the relay keeps carrying traffic meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import socket
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from tunnelplane.v1 import agents_pb2, agents_pb2_grpc

from agent import __version__
from agent.backoff import Backoff, BackoffPolicy
from agent.control import RelayController
from agent.counters import Counters
from agent.exchange import LinkSettings, ReversePath
from agent.reports import ReportBook

log = logging.getLogger("tunnelplane.agent.session")

#: Codes that retrying soon will not fix: a bad key, a key for another tunnel, a bad hello.
FATAL_CODES = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
    }
)
#: HTTP/2 keepalive pings, to notice a control plane that vanished without closing the
#: connection. Five minutes is the least servers accept by default.
CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 300_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.primary_user_agent", f"tunnelplane-agent/{__version__}"),
)

Call = grpc.aio.StreamStreamCall[agents_pb2.ConnectRequest, agents_pb2.ConnectResponse]


class SessionEnded(Exception):  # noqa: N818 - an outcome, not a fault of the agent
    """The control plane ended the stream, or broke the protocol."""


class GoneAway(SessionEnded):
    """The control plane said it is going away: reconnect within ``within`` seconds."""

    def __init__(self, reason: str, within: float) -> None:
        super().__init__(reason)
        self.within = within


@dataclass(frozen=True)
class SessionSettings:
    """What the session needs to know; the key is kept out of ``repr``."""

    control_plane: str
    tunnel: str
    agent_id: str
    key: str = field(repr=False)
    default_target: str = ""
    listen_host: str | None = None
    tls: bool = False
    root_certificates: bytes | None = field(default=None, repr=False)
    #: Roots to verify proxies' links with; None: links without TLS (local use).
    link_root_certificates: bytes | None = field(default=None, repr=False)
    heartbeat_interval: float = 15.0
    report_interval: float = 10.0
    #: An agent with nothing new to report still reports every this many intervals.
    quiet_reports: int = 6
    #: Longest wait for welcome after hello.
    handshake_timeout: float = 30.0
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)


class _Stream:
    """One Connect call; writes from several tasks are serialised."""

    def __init__(self, call: Call) -> None:
        self._call = call
        self._lock = asyncio.Lock()

    async def send(self, request: agents_pb2.ConnectRequest) -> None:
        async with self._lock:
            await self._call.write(request)

    async def receive(self) -> agents_pb2.ConnectResponse:
        response = await self._call.read()
        if response is grpc.aio.EOF:
            raise SessionEnded("the control plane closed the stream")
        assert isinstance(response, agents_pb2.ConnectResponse)
        return response


class Session:
    """Keeps the agent connected to the control plane until :meth:`stop`.

    ``counters`` are the relay's; ``controller`` owns the relay and applies desired
    states. Both outlive any one stream. ``interceptors`` go on every channel to the
    control plane (tracing: :mod:`agent.telemetry`).
    """

    def __init__(
        self,
        settings: SessionSettings,
        counters: Counters | None = None,
        controller: RelayController | None = None,
        *,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> None:
        self._settings = settings
        self._interceptors = list(interceptors)
        self._counters = Counters() if counters is None else counters
        self._controller = controller or RelayController(
            self._counters,
            default_target=settings.default_target,
            listen_host=settings.listen_host,
            reverse=ReversePath(
                LinkSettings(
                    tunnel=settings.tunnel,
                    agent_id=settings.agent_id,
                    key=settings.key,
                    tls=settings.link_root_certificates is not None,
                    root_certificates=settings.link_root_certificates,
                ),
                self._counters,
            ),
        )
        self._book = ReportBook()
        self._backoff = Backoff(settings.backoff)
        self._stopping = asyncio.Event()
        self._connected = asyncio.Event()
        self._applied = asyncio.Condition()
        self._quiet = 0
        self._last_active = 0
        #: Streams welcomed so far (a reconnect adds one).
        self.welcomes = 0

    @property
    def counters(self) -> Counters:
        """The relay's traffic counters."""
        return self._counters

    @property
    def controller(self) -> RelayController:
        """The owner of the relay."""
        return self._controller

    @property
    def reports(self) -> ReportBook:
        """Report numbering and the reports not acknowledged yet."""
        return self._book

    async def run(self) -> None:
        """Connect, and reconnect whenever the stream fails, until :meth:`stop`."""
        try:
            while True:
                delay = await self._attempt()
                if self._stopping.is_set():
                    break
                log.info("reconnecting", extra={"delay_seconds": round(delay, 3)})
                await _first_of(asyncio.sleep(delay), self._stopping.wait())
        finally:
            await self._controller.stop()
            log.info("session stopped")

    def stop(self) -> None:
        """Ask :meth:`run` to close the stream, stop the relay and return."""
        self._stopping.set()

    async def wait_connected(self) -> None:
        """Wait until a stream is open and welcomed."""
        await self._connected.wait()

    async def wait_applied(self, version: int) -> None:
        """Wait until a desired state of at least ``version`` has been applied."""
        async with self._applied:
            await self._applied.wait_for(lambda: self._controller.version >= version)

    async def _attempt(self) -> float:
        """One stream, from connect to failure; returns the delay before the next one."""
        started = asyncio.get_running_loop().time()
        try:
            await _first_of(self._connect(), self._stopping.wait())
        except grpc.aio.AioRpcError as exc:
            return self._after_error(exc, asyncio.get_running_loop().time() - started)
        except GoneAway as exc:
            log.info("the control plane is going away", extra={"reason": str(exc)})
            return self._backoff.soon(exc.within)
        except (SessionEnded, asyncio.InvalidStateError) as exc:
            log.warning("control plane stream ended", extra={"reason": str(exc)})
        finally:
            self._connected.clear()
        return self._backoff.next_delay(asyncio.get_running_loop().time() - started)

    def _after_error(self, exc: grpc.aio.AioRpcError, lasted: float) -> float:
        fields = {"code": exc.code().name, "details": exc.details()}
        if exc.code() in FATAL_CODES:
            log.error(
                "the control plane refused this agent; check TP_AGENT_KEY, --tunnel and"
                " --agent-id (retrying will not help until they are fixed)",
                extra=fields,
            )
            return self._backoff.at_cap()
        log.warning("control plane stream failed", extra=fields)
        return self._backoff.next_delay(lasted)

    async def _connect(self) -> None:
        async with self._channel() as channel:
            stub = agents_pb2_grpc.AgentServiceStub(channel)
            stream = _Stream(stub.Connect(metadata=self._metadata()))
            heartbeat = await self._handshake(stream)
            await _first_of(
                self._heartbeats(stream, heartbeat), self._reports(stream), self._receive(stream)
            )

    def _channel(self) -> grpc.aio.Channel:
        target, interceptors = self._settings.control_plane, self._interceptors
        if not self._settings.tls:
            return grpc.aio.insecure_channel(
                target, options=CHANNEL_OPTIONS, interceptors=interceptors
            )
        credentials = grpc.ssl_channel_credentials(self._settings.root_certificates)
        return grpc.aio.secure_channel(
            target, credentials, options=CHANNEL_OPTIONS, interceptors=interceptors
        )

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._settings.key}"),)

    def _hello(self) -> agents_pb2.AgentHello:
        return agents_pb2.AgentHello(
            tunnel=self._settings.tunnel,
            agent_id=self._settings.agent_id,
            version=__version__,
            hostname=socket.gethostname(),
            os=platform.platform(),
        )

    async def _handshake(self, stream: _Stream) -> float:
        """Hello, welcome, and the resending of unacknowledged reports; the heartbeat."""
        await stream.send(agents_pb2.ConnectRequest(hello=self._hello()))
        try:
            async with asyncio.timeout(self._settings.handshake_timeout):
                response = await stream.receive()
        except TimeoutError:
            raise SessionEnded("no welcome from the control plane") from None
        if response.WhichOneof("kind") == "go_away":
            raise _gone_away(response.go_away)  # a control plane that is stopping already
        if response.WhichOneof("kind") != "welcome":
            raise SessionEnded(f"expected welcome, got {response.WhichOneof('kind')}")
        welcome = response.welcome
        self.welcomes += 1
        self._book.resume(welcome.last_sequence)
        pending = self._book.pending
        log.info(
            "connected",
            extra={
                "session": welcome.session,
                "last_sequence": welcome.last_sequence,
                "resending": len(pending),
            },
        )
        for report in pending:
            await stream.send(agents_pb2.ConnectRequest(report=report))
        self._connected.set()
        return self._heartbeat_interval(welcome)

    def _heartbeat_interval(self, welcome: agents_pb2.AgentWelcome) -> float:
        """Ours, or the control plane's when that is shorter."""
        asked = welcome.heartbeat_interval.ToTimedelta().total_seconds()
        ours = self._settings.heartbeat_interval
        return min(ours, asked) if asked > 0 else ours

    async def _heartbeats(self, stream: _Stream, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            beat = agents_pb2.AgentHeartbeat(active_connections=self._counters.active)
            await stream.send(agents_pb2.ConnectRequest(heartbeat=beat))

    async def _reports(self, stream: _Stream) -> None:
        while True:
            await asyncio.sleep(self._settings.report_interval)
            report = self._due_report()
            if report is not None:
                await stream.send(agents_pb2.ConnectRequest(report=report))

    def _due_report(self) -> agents_pb2.AgentReport | None:
        """A new report when there is news, or when the agent has been quiet too long."""
        self._quiet += 1
        if not self._book.can_add():
            return None  # the traffic stays in the counters for a later report
        snapshot = self._counters.take()
        news = snapshot.has_traffic() or snapshot.active != self._last_active
        if not news and self._quiet < self._settings.quiet_reports:
            return None  # nothing lost: an empty interval holds only the current gauges
        self._quiet = 0
        self._last_active = snapshot.active
        return self._book.add(snapshot)

    async def _receive(self, stream: _Stream) -> None:
        while True:
            response = await stream.receive()
            kind = response.WhichOneof("kind")
            if kind == "desired_state":
                # Shielded: a stream failing mid-change must not leave the relay half-built.
                await asyncio.shield(self._apply(response.desired_state))
            elif kind == "ack":
                self._book.acknowledge(response.ack)
            elif kind == "go_away":
                raise _gone_away(response.go_away)
            else:
                log.warning("unexpected message from the control plane", extra={"kind": kind})

    async def _apply(self, state: agents_pb2.DesiredState) -> None:
        await self._controller.apply(state)
        async with self._applied:
            self._applied.notify_all()


def _gone_away(message: agents_pb2.GoAway) -> GoneAway:
    within = message.reconnect_within.ToTimedelta().total_seconds()
    return GoneAway(message.reason or "going away", within)


async def _first_of(*awaitables: Coroutine[Any, Any, Any]) -> None:
    """Run concurrently until the first ends; cancel the rest; raise what the first raised."""
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if task in done:
            task.result()
