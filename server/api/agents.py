"""AgentService: the agents' Connect streams."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from google.protobuf.message import Message
from tunnelplane.v1 import agents_pb2

from server.api import convert
from server.api import tunnel_convert as tc
from server.domain.agents import AgentSessions, Hello
from server.domain.endpoints import parse_endpoint_url
from server.domain.events import Event
from server.domain.principal import Principal, Tier
from server.domain.traffic import Report
from server.domain.tunnel_service import TunnelService
from server.domain.tunnels import Tunnel, TunnelState
from server.errors import DomainError, InvalidArgument
from server.pipeline import Call

A = agents_pb2
log = logging.getLogger("tunnelplane.agents")
HELLO_TIMEOUT = 30.0


class AgentApi:
    """Serves ``tunnelplane.v1.AgentService``."""

    def __init__(
        self,
        agents: AgentSessions,
        tunnels: TunnelService,
        stopping: Callable[[], bool],
        recheck: Callable[[Call], Awaitable[object]],
        background: asyncio.Lock | None = None,
    ) -> None:
        self.agents = agents
        self.tunnels = tunnels
        self._stopping = stopping
        #: Verifies the call's credential again (a revoked key ends the stream).
        self.recheck = recheck
        #: Held while a session's end is written: it comes at a time of its own (silence,
        #: a dropped connection), like the background passes that hold the same lock.
        self._background = background or asyncio.Lock()

    def tier_connections(self, tier: Tier) -> int:
        """The tier's concurrent connection limit (-1: unlimited)."""
        return self.tunnels.tier_limits(tier).max_concurrent_connections

    async def Connect(self, request: Message, call: Call) -> Message:
        """One agent's session, until it goes away or falls silent."""
        principal = call.principal
        assert principal is not None
        hello = await _hello(call)
        tunnel, last = await self.agents.hello(principal, hello)
        session = _Session(self, call, principal, tunnel, hello.agent_id)
        ended_by_agent = True
        try:
            await session.run(last)
        except asyncio.CancelledError:
            # The agent's connection dropped, or this server is stopping: in the second
            # case the agent reconnects elsewhere and the sweeper decides if it does not.
            ended_by_agent = not self._stopping()
            raise
        finally:
            if ended_by_agent:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._goodbye(tunnel.id, hello.agent_id))
        return A.ConnectResponse()

    async def _goodbye(self, tunnel_id: str, agent_id: str) -> None:
        async with self._background:
            await self.agents.goodbye(tunnel_id, agent_id)


class _Session:
    """The two halves of one stream: the agent's messages, and desired-state changes."""

    def __init__(
        self, api: AgentApi, call: Call, principal: Principal, tunnel: Tunnel, agent_id: str
    ) -> None:
        self._api = api
        self._call = call
        self._principal = principal
        self._tunnel = tunnel
        self._agent_id = agent_id
        self._lock = asyncio.Lock()
        self._version = -1
        self._sent: A.DesiredState | None = None

    async def send(self, message: A.ConnectResponse) -> None:
        async with self._lock:  # the two halves must not write at once
            await self._call.send(message)

    async def run(self, last_sequence: int) -> None:
        settings = self._api.agents.settings
        await self.send(
            A.ConnectResponse(
                welcome=A.AgentWelcome(
                    session=f"{self._tunnel.name}/agents/{self._agent_id}",
                    heartbeat_interval=tc.duration(settings.heartbeat_interval),
                    last_sequence=last_sequence,
                )
            )
        )
        subscription = self._api.tunnels.bus.subscribe(self._tunnel.user_id)
        try:
            await self.desired(self._tunnel)
            watching = asyncio.create_task(self._watch(subscription))
            try:
                await self._read(settings.heartbeat_timeout)
            finally:
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching
        finally:
            await subscription.close()

    async def desired(self, tunnel: Tunnel) -> None:
        """Tell the agent what the tunnel should do, if that changed."""
        if tunnel.version == self._version:
            return
        self._version = tunnel.version
        self._tunnel = tunnel
        target = ""
        if tunnel.active_endpoint:
            target = parse_endpoint_url(tunnel.active_endpoint, "endpoint").target
        carrying = tunnel.status.running and tunnel.state is not TunnelState.ERROR
        config = tc.config(tunnel.config)
        if not config.max_connections:  # the tier's limit (unlimited: 0)
            config.max_connections = max(0, self._api.tier_connections(self._principal.tier))
        state = A.DesiredState(
            run=A.DesiredState.RUN_STARTED if carrying else A.DesiredState.RUN_STOPPED,
            listen_address=self._api.tunnels.listen_address(tunnel),
            target=target,
            config=config,
        )
        if state == self._sent:
            return  # the tunnel changed, but not what its agents must do
        self._sent = A.DesiredState()
        self._sent.CopyFrom(state)
        state.version = tunnel.version
        await self.send(A.ConnectResponse(desired_state=state))

    async def _read(self, silence: float) -> None:
        """The agent's messages; ``silence`` seconds without one end the session."""
        while True:
            try:
                async with asyncio.timeout(silence):
                    message = await self._call.receive()
            except TimeoutError:
                log.info("agent went silent", extra={"tunnel": self._tunnel.id})
                return
            if message is None:
                return
            await self._handle(message)

    async def _handle(self, message: Message) -> None:
        assert isinstance(message, A.ConnectRequest)
        kind = message.WhichOneof("kind")
        agents = self._api.agents
        if kind == "heartbeat":
            await self._api.recheck(self._call)  # a key revoked mid-session ends it
            active = message.heartbeat.active_connections
            await agents.heartbeat(self._tunnel.id, self._agent_id, active)
        elif kind == "report":
            report = _report(message.report, self._agent_id, agents)
            counted = await agents.report(
                self._tunnel, self._agent_id, report, self._principal.tier
            )
            ack = A.ReportAck(sequence=report.sequence, counted=counted)
            await self.send(A.ConnectResponse(ack=ack))
        else:
            raise InvalidArgument.single("hello", "hello was sent already")

    async def _watch(self, subscription: object) -> None:
        async for event in subscription:  # type: ignore[attr-defined]
            if not isinstance(event, Event) or event.subject != self._tunnel.name:
                continue
            if event.type == "tunnel.deleted":
                stopped = A.DesiredState(run=A.DesiredState.RUN_STOPPED, version=self._version + 1)
                await self.send(A.ConnectResponse(desired_state=stopped))
                continue
            try:
                fresh = await self._api.tunnels.get(self._tunnel.user_id, self._tunnel.id)
            except DomainError:
                continue
            await self.desired(fresh)


async def _hello(call: Call) -> Hello:
    try:
        async with asyncio.timeout(HELLO_TIMEOUT):
            first = await call.receive()
    except TimeoutError:
        raise InvalidArgument.single("hello", "send hello first") from None
    if not isinstance(first, A.ConnectRequest) or first.WhichOneof("kind") != "hello":
        raise InvalidArgument.single("hello", "the first message must be hello")
    h = first.hello
    return Hello(h.tunnel, h.agent_id, h.version, h.hostname, h.os)


def _report(message: A.AgentReport, agent_id: str, agents: AgentSessions) -> Report:
    time = None
    if message.HasField("time"):
        time = convert.from_timestamp(message.time, "report.time")
    return Report.checked(
        agent_id=agent_id,
        sequence=message.sequence,
        time=time,
        now=agents.now(),
        request_count=message.request_count,
        success_count=message.success_count,
        error_count=message.error_count,
        latency_buckets=list(message.latency_buckets),
        connections=message.connections,
        bytes_in=message.bytes_in,
        bytes_out=message.bytes_out,
        peak_concurrency=message.peak_concurrency,
        active_connections=message.active_connections,
    )
