"""One agent's Connect stream once hello is done: welcome, desired states, reports and
their acknowledgements, and the go-away of a server that is stopping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from google.protobuf.message import Message
from prometheus_client import CollectorRegistry, Counter, Gauge
from tunnelplane.v1 import agents_pb2

from server.api import convert
from server.api import tunnel_convert as tc
from server.domain.common.errors import DomainError, InvalidArgument, NotFound, clip
from server.domain.events.bus import SubscriptionLostError
from server.domain.events.model import Event
from server.domain.identity.model import Principal
from server.domain.identity.suspension import ACCESS_EVENTS
from server.domain.tunnels.agents import AGENTS_RESET, LEFT, SILENT, AgentSessions
from server.domain.tunnels.endpoints import parse_endpoint_url
from server.domain.tunnels.model import Tunnel
from server.domain.tunnels.rules import carrying
from server.domain.tunnels.service import TunnelService
from server.domain.tunnels.traffic import Report
from server.pipeline import Call

A = agents_pb2
T = TypeVar("T")
log = logging.getLogger("tunnelplane.agents")
#: What a go-away tells agents.
SHUTTING_DOWN = "the server is shutting down"


class AgentMetrics:
    """Prometheus metrics of agent streams."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.reports = Counter(
            "tunnelplane_agent_reports",
            "Agent reports by result: counted, duplicate (counted before) or refused "
            "(invalid, not counted; the stream goes on).",
            ["result"],
            registry=registry,
        )
        self.streams = Gauge(
            "tunnelplane_agent_streams", "Agent Connect streams open now.", registry=registry
        )


@dataclass(frozen=True, slots=True)
class StreamParts:
    """What every agent stream of a server shares."""

    agents: AgentSessions
    tunnels: TunnelService
    #: Verifies the call's credential again (a revoked key ends the stream).
    recheck: Callable[[Call], Awaitable[object]]
    metrics: AgentMetrics
    #: Set when the server is going away: every stream says so and ends.
    going_away: asyncio.Event
    #: Where an owner's agents link to the owner's own proxies (ProxyService.StartProxy).
    owner_links: Callable[[str], Awaitable[tuple[str, ...]]]


def go_away_message(reconnect_within: float) -> A.ConnectResponse:
    """Tells an agent that this server is going away and when to reconnect."""
    return A.ConnectResponse(
        go_away=A.GoAway(reason=SHUTTING_DOWN, reconnect_within=tc.duration(reconnect_within))
    )


class AgentStream:
    """The two halves of one stream: the agent's messages, and desired-state changes."""

    def __init__(
        self, parts: StreamParts, call: Call, principal: Principal, tunnel: Tunnel, agent_id: str
    ) -> None:
        self._parts = parts
        self._call = call
        self._principal = principal
        self._tunnel = tunnel
        self._agent_id = agent_id
        self._lock = asyncio.Lock()
        self._version = -1
        self._sent: A.DesiredState | None = None
        self._links: tuple[str, ...] = ()
        #: Set when an administrator reset the tunnel's agent sessions: the stream ends.
        self._reset = asyncio.Event()

    async def send(self, message: A.ConnectResponse) -> None:
        """Send one message (the two halves must not write at once)."""
        async with self._lock:
            await self._call.send(message)

    async def run(self, last_sequence: int) -> str | None:
        """Serve the stream until the agent leaves (:data:`LEFT`) or falls silent
        (:data:`SILENT`), or the server goes away (None: the agent was told to reconnect,
        and it is not gone)."""
        settings = self._parts.agents.settings
        await self.send(
            A.ConnectResponse(
                welcome=A.AgentWelcome(
                    session=f"{self._tunnel.name}/agents/{self._agent_id}",
                    heartbeat_interval=tc.duration(settings.heartbeat_interval),
                    last_sequence=last_sequence,
                )
            )
        )
        subscription = self._parts.tunnels.bus.subscribe(self._tunnel.user_id)
        try:
            self._links = await self._parts.owner_links(self._tunnel.user_id)
            await self.desired(self._tunnel)
            watching = asyncio.create_task(self._watch(subscription))
            try:
                ended = await _first_of(
                    self._read(settings.heartbeat_timeout),
                    self._until_going_away(),
                    self._until_reset(),
                )
            finally:
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching
        finally:
            await subscription.close()
        if ended is None:
            await self.send(go_away_message(settings.reconnect_within))
        return ended

    async def _until_going_away(self) -> str | None:
        await self._parts.going_away.wait()
        return None

    async def _until_reset(self) -> str | None:
        """Its session was closed already: the agent is told to go away and reconnects."""
        await self._reset.wait()
        return None

    async def desired(self, tunnel: Tunnel, *, links_changed: bool = False) -> None:
        """Tell the agent what the tunnel should do, if that changed."""
        if tunnel.version == self._version and not links_changed:
            return
        self._version = tunnel.version
        self._tunnel = tunnel
        state = self._desired_state(tunnel)
        if state == self._sent:
            return  # the tunnel changed, but not what its agents must do
        self._sent = A.DesiredState()
        self._sent.CopyFrom(state)
        state.version = tunnel.version
        await self.send(A.ConnectResponse(desired_state=state))

    def _desired_state(self, tunnel: Tunnel) -> A.DesiredState:
        target = ""
        if tunnel.active_endpoint:
            target = parse_endpoint_url(tunnel.active_endpoint, "endpoint").target
        config = tc.config(tunnel.config)
        if not config.max_connections:  # the tier's limit (unlimited: 0)
            limits = self._parts.tunnels.tier_limits(self._principal.tier)
            config.max_connections = max(0, limits.max_concurrent_connections)
        fields: dict[str, Any] = {
            "listen_address": self._parts.tunnels.listen_address(tunnel),
            "target": target,
            "config": config,
            "proxy_links": tuple(
                dict.fromkeys(self._parts.agents.settings.proxy_links + self._links)
            ),
            "target_url": tunnel.active_endpoint,
        }
        if not carrying(tunnel):
            return self._stopped(**fields)
        return A.DesiredState(run=A.DesiredState.RUN_STARTED, **fields)

    def _stopped(self, **fields: Any) -> A.DesiredState:
        grace = tc.duration(self._parts.agents.settings.stop_grace)
        return A.DesiredState(run=A.DesiredState.RUN_STOPPED, stop_grace=grace, **fields)

    async def _read(self, silence: float) -> str:
        """The agent's messages; ``silence`` seconds without one end the session. Why it
        ended."""
        while True:
            try:
                async with asyncio.timeout(silence):
                    message = await self._call.receive()
            except TimeoutError:
                log.info("agent went silent", extra={"tunnel": self._tunnel.id})
                return SILENT
            if message is None:
                return LEFT
            await self._handle(message)

    async def _handle(self, message: Message) -> None:
        assert isinstance(message, A.ConnectRequest)
        kind = message.WhichOneof("kind")
        if kind == "heartbeat":
            await self._parts.recheck(self._call)  # a key revoked mid-session ends it
            active = message.heartbeat.active_connections
            await self._parts.agents.heartbeat(self._tunnel.id, self._agent_id, active)
        elif kind == "report":
            await self._report(message.report)
        else:
            raise InvalidArgument.single("hello", "hello was sent already")

    async def _report(self, message: A.AgentReport) -> None:
        """Count a report once, or refuse it; either way the stream goes on."""
        agents = self._parts.agents
        try:
            report = _report(message, self._agent_id, agents.now())
        except InvalidArgument as refused:
            await self._refuse(message.sequence, refused)
            return
        counted = await agents.report(self._tunnel, self._agent_id, report, self._principal.tier)
        self._parts.metrics.reports.labels("counted" if counted else "duplicate").inc()
        await self.send(
            A.ConnectResponse(ack=A.ReportAck(sequence=report.sequence, counted=counted))
        )

    async def _refuse(self, sequence: int, refused: InvalidArgument) -> None:
        """One bad report is not counted; the agent is told to drop it, and keeps its session
        (ending it would make the agent send the same report again, forever)."""
        self._parts.metrics.reports.labels("refused").inc()
        fields = sorted({v.field for v in refused.violations})
        log.warning(
            "agent report refused",
            extra={
                "tunnel": self._tunnel.id,
                "agent_id": self._agent_id,
                "sequence": sequence,
                "fields": fields,
            },
        )
        ack = A.ReportAck(sequence=sequence, refused=True, refusal=clip(refused.message))
        await self.send(A.ConnectResponse(ack=ack))

    async def _watch(self, subscription: object) -> None:
        """Follow the owner's events; when some may have passed the subscription by, read
        the tunnel and the owner's proxies again and go on."""
        while True:
            try:
                await self._follow(subscription)
            except SubscriptionLostError:
                await self._catch_up()
            else:
                return

    async def _catch_up(self) -> None:
        await self._relink()
        try:
            fresh = await self._parts.tunnels.get(self._tunnel.user_id, self._tunnel.id)
        except NotFound:
            stopped = self._stopped(version=self._version + 1)
            await self.send(A.ConnectResponse(desired_state=stopped))
            return
        except DomainError:
            return  # the database is away for now; the next event reads it again
        await self.desired(fresh)

    async def _follow(self, subscription: object) -> None:
        proxies = f"users/{self._tunnel.user_id}/proxies/"
        owner = f"users/{self._tunnel.user_id}"
        async for event in subscription:  # type: ignore[attr-defined]
            if isinstance(event, Event) and event.subject.startswith(proxies):
                await self._relink()
                continue
            if isinstance(event, Event) and event.type in ACCESS_EVENTS and event.subject == owner:
                self._reset.set()  # the owner was suspended or deleted: its agents go
                return
            if not isinstance(event, Event) or event.subject != self._tunnel.name:
                continue
            if event.type == AGENTS_RESET:
                self._reset.set()
                return
            if event.type == "tunnel.deleted":
                stopped = self._stopped(version=self._version + 1)
                await self.send(A.ConnectResponse(desired_state=stopped))
                continue
            try:
                fresh = await self._parts.tunnels.get(self._tunnel.user_id, self._tunnel.id)
            except DomainError:
                continue
            await self.desired(fresh)

    async def _relink(self) -> None:
        """The owner's proxies changed: tell the agent where to link if that moved."""
        links = await self._parts.owner_links(self._tunnel.user_id)
        if links != self._links:
            self._links = links
            await self.desired(self._tunnel, links_changed=True)


def _report(message: A.AgentReport, agent_id: str, now: datetime) -> Report:
    time = None
    if message.HasField("time"):
        time = convert.from_timestamp(message.time, "report.time")
    return Report.checked(
        agent_id=agent_id,
        sequence=message.sequence,
        time=time,
        now=now,
        request_count=message.request_count,
        success_count=message.success_count,
        error_count=message.error_count,
        latency_buckets=list(message.latency_buckets),
        connections=message.connections,
        bytes_in=message.bytes_in,
        bytes_out=message.bytes_out,
        peak_concurrency=message.peak_concurrency,
        stream_milliseconds=message.stream_milliseconds,
        active_connections=message.active_connections,
    )


async def _first_of(*awaitables: Coroutine[Any, Any, T]) -> T:
    """Run concurrently until the first ends; cancel the rest; the first's result (or what
    it raised)."""
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    first = next(task for task in tasks if task in done)
    return first.result()
