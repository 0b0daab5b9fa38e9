"""AgentService: the agents' Connect streams."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from google.protobuf.message import Message
from tunnelplane.v1 import agents_pb2

from server.api.agent_stream import AgentMetrics, AgentStream, StreamParts, go_away_message
from server.domain.common.errors import InvalidArgument
from server.domain.tunnels.agents import LEFT, AgentSessions
from server.domain.tunnels.model import Hello
from server.domain.tunnels.service import TunnelService
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
        metrics: AgentMetrics,
        owner_links: Callable[[str], Awaitable[tuple[str, ...]]],
    ) -> None:
        self.agents = agents
        self.tunnels = tunnels
        self._stopping = stopping
        self._parts = StreamParts(agents, tunnels, recheck, metrics, asyncio.Event(), owner_links)

    def go_away(self) -> None:
        """This server is stopping: every agent stream tells its agent to reconnect (to
        another replica) and ends now, rather than holding the shutdown grace; streams
        that open from now on are told the same at once."""
        self._parts.going_away.set()

    async def Connect(self, request: Message, call: Call) -> Message:
        """One agent's session, until it goes away or falls silent."""
        principal = call.principal
        assert principal is not None
        if self._parts.going_away.is_set():
            await call.send(go_away_message(self.agents.settings.reconnect_within))
            return A.ConnectResponse()
        hello = await _hello(call)
        tunnel, last = await self.agents.hello(principal, hello)
        stream = AgentStream(self._parts, call, principal, tunnel, hello.agent_id)
        ended: str | None = LEFT
        self._parts.metrics.streams.inc()
        try:
            # Told to go away (None), the agent is not gone: it reconnects elsewhere at
            # once, and the sweeper decides if it does not.
            ended = await stream.run(last)
        except asyncio.CancelledError:
            # The agent's connection dropped, or this server is stopping: in the second
            # case the agent reconnects elsewhere and the sweeper decides if it does not.
            ended = None if self._stopping() else LEFT
            raise
        finally:
            self._parts.metrics.streams.dec()
            if ended is not None:
                goodbye = self.agents.goodbye(tunnel.id, hello.agent_id, ended)
                with contextlib.suppress(Exception):
                    await asyncio.shield(goodbye)
        return A.ConnectResponse()


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
