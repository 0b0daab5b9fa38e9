"""Agent sessions, their reports, and the tunnel traffic and usage read from them.

An agent holds one Connect stream. Its session row survives reconnects (same agent id), so
a reconnect resumes: the control plane tells it the last report sequence it counted.
Reports are counted once each (the (tunnel, agent, sequence) key is stored with the usage
it adds, in one transaction). An agent whose heartbeats stop for the timeout counts as
gone; the tunnel's state and health follow the number of agents connected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from server.domain.audit import service as audit
from server.domain.audit.model import AuditTrail
from server.domain.common.clock import Clock
from server.domain.common.errors import ResourceExhausted, Violations
from server.domain.events.service import record
from server.domain.identity.model import Principal, Tier
from server.domain.tunnels.model import (
    AgentSession,
    Hello,
    Tunnel,
    TunnelState,
    TunnelTraffic,
    UsageRow,
)
from server.domain.tunnels.rules import carried_tunnel, owned
from server.domain.tunnels.service import TunnelService
from server.domain.tunnels.traffic import DateRange, Report
from server.domain.unit_of_work import UnitOfWorkFactory

AGENT_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
#: Why a tunnel left without agents is disconnected (its ``state_reason``): its last agent's
#: stream ended, or its last agent fell silent.
LEFT = "the last agent disconnected"
SILENT = "the last agent went silent"
RESET = "an administrator reset the agent sessions"
#: The event on which every replica ends the tunnel's agent streams.
AGENTS_RESET = "tunnel.agents_reset"


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """Timing of agent sessions."""

    heartbeat_interval: float = 15.0
    #: Silent this long, an agent counts as disconnected.
    heartbeat_timeout: float = 90.0
    #: A disconnected agent is forgotten (no longer degrades health) after this long.
    forget_after: float = 600.0
    #: How long a stopped tunnel's open connections may go on before its agents close them.
    stop_grace: float = 10.0
    #: Agents told to go away (the server is stopping) reconnect within this long.
    reconnect_within: float = 1.0
    #: Where agents open their links to streaming proxies (``host:port``), in order.
    proxy_links: tuple[str, ...] = ()


class AgentSessions:
    """What happens on agents' streams, and what is read from their reports."""

    def __init__(
        self,
        uow: UnitOfWorkFactory,
        tunnels: TunnelService,
        clock: Clock,
        settings: AgentSettings,
    ) -> None:
        self._uow = uow
        self._tunnels = tunnels
        self._clock = clock
        self.settings = settings

    async def hello(self, principal: Principal, hello: Hello) -> tuple[Tunnel, int]:
        """Open (or resume) the agent's session; the tunnel and the last counted sequence."""
        owner_id, tunnel_id = carried_tunnel(principal, hello.tunnel, "hello.tunnel")
        _check_hello(hello)
        now = self._clock.now()
        async with self._uow() as uow:
            tunnel = owned(await uow.tunnels.get(tunnel_id), owner_id, tunnel_id)
            session = AgentSession(
                tunnel_id=tunnel_id,
                agent_id=hello.agent_id,
                api_key_id=principal.api_key_id,
                version=hello.version,
                hostname=hello.hostname,
                os=hello.os,
                connected=True,
                active_connections=0,
                connect_time=now,
                last_seen_time=now,
            )
            await uow.agents.open(session)
            last = await uow.agents.last_sequence(tunnel_id, hello.agent_id)
        return await self._recount(tunnel_id) or tunnel, last

    def now(self) -> datetime:
        """The current time (reports are checked against it)."""
        return self._clock.now()

    async def heartbeat(self, tunnel_id: str, agent_id: str, active: int) -> None:
        """The agent is alive."""
        async with self._uow() as uow:
            await uow.agents.seen(tunnel_id, agent_id, self._clock.now(), max(0, active))

    async def report(self, tunnel: Tunnel, agent_id: str, report: Report, tier: Tier) -> bool:
        """Count a report once; False when it had been counted already."""
        now = self._clock.now()
        async with self._uow() as uow:
            counted = await uow.agents.add_report(tunnel, agent_id, report, tier, now)
            await uow.agents.seen(tunnel.id, agent_id, now, report.active_connections)
        if counted and (report.bytes_in or report.bytes_out or report.stream_milliseconds):
            await self._enforce_transfer(tunnel, tier)
        return counted

    async def _enforce_transfer(self, tunnel: Tunnel, tier: Tier) -> None:
        """A tunnel whose owner used up the month's transfer (or stream time) goes to
        ``error`` (its agents stop carrying traffic) until the owner starts it again with
        quota to spare."""
        try:
            async with self._uow(readonly=True) as uow:
                await self._tunnels.check_transfer(uow, tunnel.user_id, tier)
        except ResourceExhausted as exhausted:
            current = await self._tunnels.get(tunnel.user_id, tunnel.id)
            if current.status.running and current.state is not TunnelState.ERROR:
                await self._tunnels.fail(tunnel.user_id, tunnel.id, str(exhausted))

    async def goodbye(self, tunnel_id: str, agent_id: str, reason: str) -> None:
        """The agent's stream ended; ``reason`` (:data:`LEFT`, :data:`SILENT`) is what its
        tunnel says if no agent is left."""
        async with self._uow() as uow:
            await uow.agents.close(tunnel_id, agent_id)
        await self._recount(tunnel_id, reason)

    async def reset(
        self, owner_id: str, tunnel_id: str, reason: str, trail: AuditTrail | None = None
    ) -> int:
        """End every agent session of the tunnel now (an administrator's recovery): close
        the open ones, and record ``tunnel.agents_reset``, on which each replica ends the
        tunnel's agent streams it holds (the agents reconnect). How many were open."""
        now = self._clock.now()
        async with self._uow() as uow:
            tunnel = owned(await uow.tunnels.get(tunnel_id), owner_id, tunnel_id)
            sessions = await uow.agents.sessions(tunnel_id)
            open_ones = [s for s in sessions if s.connected]
            for session in open_ones:
                await uow.agents.close(tunnel_id, session.agent_id)
            await audit.record(
                uow, trail, now, subject_user_id=owner_id, resource=tunnel.name, reason=reason,
                closed=[s.agent_id for s in open_ones],
            )  # fmt: skip
            await record(
                uow, self._tunnels.bus, self._clock, AGENTS_RESET, subject=tunnel.name,
                user_id=owner_id, actor=audit.actor(trail), payload={"closed": len(open_ones)},
            )  # fmt: skip
        await self._recount(tunnel_id, RESET)
        return len(open_ones)

    async def sweep(self) -> int:
        """Mark silent agents disconnected and forget old ones; returns tunnels changed."""
        now = self._clock.now()
        silent = now - timedelta(seconds=self.settings.heartbeat_timeout)
        forgotten = now - timedelta(seconds=self.settings.forget_after)
        async with self._uow() as uow:
            changed = await uow.agents.expire(silent, forgotten)
        for tunnel_id in changed:
            await self._recount(tunnel_id, SILENT)
        return len(changed)

    async def traffic(self, tunnel: Tunnel) -> TunnelTraffic:
        """Totals over the tunnel's life, and its agents' current connections."""
        async with self._uow(lag_tolerant=True) as uow:
            totals = await uow.agents.totals(tunnel.id)
            sessions = await uow.agents.sessions(tunnel.id)
        active = sum(s.active_connections for s in sessions if s.connected)
        reported = [s.last_report_time for s in sessions if s.last_report_time is not None]
        return TunnelTraffic(totals, active, max(reported, default=totals.last_report_time))

    async def usage(
        self, *, user_id: str | None, tunnel_id: str | None, days: DateRange
    ) -> list[UsageRow]:
        """Stored usage rows in ``days`` of a user, a tunnel, or everyone."""
        async with self._uow(lag_tolerant=True) as uow:
            return await uow.agents.usage(user_id, tunnel_id, days.start, days.end)

    async def _recount(self, tunnel_id: str, reason: str = "") -> Tunnel | None:
        """Tell the tunnel how many agents it has; ``reason``: why one left, if one did."""
        async with self._uow(readonly=True) as uow:
            sessions = await uow.agents.sessions(tunnel_id)
        connected = sum(1 for s in sessions if s.connected)
        lost = len(sessions) - connected
        return await self._tunnels.agents_changed(tunnel_id, connected, lost, reason)


def today(clock: Clock) -> date:
    """The current UTC day."""
    return clock.now().date()


def _check_hello(hello: Hello) -> None:
    violations = Violations()
    if not AGENT_ID.fullmatch(hello.agent_id):
        violations.add("hello.agent_id", "1-64 characters of letters, digits, '.', '_' or '-'")
    for field, value in (
        ("version", hello.version),
        ("hostname", hello.hostname),
        ("os", hello.os),
    ):
        if len(value) > 255 or any(ord(c) < 0x20 for c in value):
            violations.add(f"hello.{field}", "at most 255 printable characters")
    violations.raise_if_any()
