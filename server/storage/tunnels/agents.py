"""Agent sessions, counted reports and per-day tunnel usage."""

from __future__ import annotations

import builtins
from datetime import date, datetime

import sqlalchemy as sa

from server.domain.identity.model import Tier
from server.domain.tunnels.model import AgentSession, Tunnel, UsageRow
from server.domain.tunnels.traffic import DailyUsage, Report, Totals
from server.storage.base import Repository
from server.storage.tables import (
    LATENCY_COLUMNS,
    agent_reports,
    agent_sessions,
    tunnel_usage,
    tunnels,
)

_a = agent_sessions.c
_r = agent_reports.c
_u = tunnel_usage.c
_SUMMED = ["connections", "bytes_in", "bytes_out", "request_count", "success_count",
           "error_count", *LATENCY_COLUMNS]  # fmt: skip


def _session(row: sa.RowMapping) -> AgentSession:
    return AgentSession(
        row["tunnel_id"],
        row["agent_id"],
        row["api_key_id"],
        row["version"],
        row["hostname"],
        row["os"],
        row["connected"],
        row["active_connections"],
        row["connect_time"],
        row["last_seen_time"],
        row["last_report_time"],
    )


class SqlAgentRepository(Repository):
    """Agents and usage in SQL."""

    async def open(self, session: AgentSession) -> None:
        """Insert the session, or mark the existing one connected again."""
        values = {
            "tunnel_id": session.tunnel_id,
            "agent_id": session.agent_id,
            "api_key_id": session.api_key_id,
            "version": session.version,
            "hostname": session.hostname,
            "os": session.os,
            "connected": True,
            "active_connections": 0,
            "connect_time": session.connect_time,
            "last_seen_time": session.last_seen_time,
        }
        stmt = self._insert_stmt(agent_sessions).values(**values)
        kept = {k: v for k, v in values.items() if k not in {"tunnel_id", "agent_id"}}
        await self._conn.execute(
            stmt.on_conflict_do_update(index_elements=["tunnel_id", "agent_id"], set_=kept)
        )

    async def seen(self, tunnel_id: str, agent_id: str, now: datetime, active: int) -> None:
        await self._conn.execute(
            sa.update(agent_sessions)
            .where(_a.tunnel_id == tunnel_id, _a.agent_id == agent_id)
            .values(last_seen_time=now, active_connections=active, connected=True)
        )

    async def close(self, tunnel_id: str, agent_id: str) -> None:
        await self._conn.execute(
            sa.update(agent_sessions)
            .where(_a.tunnel_id == tunnel_id, _a.agent_id == agent_id)
            .values(connected=False, active_connections=0)
        )

    async def sessions(self, tunnel_id: str) -> builtins.list[AgentSession]:
        stmt = sa.select(agent_sessions).where(_a.tunnel_id == tunnel_id)
        return [_session(row) for row in await self._all(stmt)]

    async def expire(self, silent: datetime, forgotten: datetime) -> builtins.list[str]:
        """Disconnect agents unseen since ``silent``; forget those unseen since
        ``forgotten``. The tunnels whose agents changed."""
        stale = sa.select(_a.tunnel_id).where(
            sa.or_(
                sa.and_(_a.connected.is_(True), _a.last_seen_time < silent),
                _a.last_seen_time < forgotten,
            )
        )
        changed = sorted({row["tunnel_id"] for row in await self._all(stale)})
        if changed:
            await self._conn.execute(
                sa.update(agent_sessions)
                .where(_a.connected.is_(True), _a.last_seen_time < silent)
                .values(connected=False, active_connections=0)
            )
            await self._conn.execute(sa.delete(agent_sessions).where(_a.last_seen_time < forgotten))
        return changed

    async def last_sequence(self, tunnel_id: str, agent_id: str) -> int:
        stmt = sa.select(sa.func.max(_r.sequence)).where(
            _r.tunnel_id == tunnel_id, _r.agent_id == agent_id
        )
        return int((await self._conn.execute(stmt)).scalar_one() or 0)

    async def add_report(
        self, tunnel: Tunnel, agent_id: str, report: Report, tier: Tier, now: datetime
    ) -> bool:
        """Record the report's key and add its usage; False if it was recorded before."""
        inserted = await self._conn.execute(
            self._insert_stmt(agent_reports)
            .values(
                tunnel_id=tunnel.id, agent_id=agent_id, sequence=report.sequence, receive_time=now
            )
            .on_conflict_do_nothing()
            .returning(_r.sequence)
        )
        if inserted.first() is None:  # rowcount is not reliable here on every driver
            return False
        await self._add_usage(tunnel, report, tier)
        await self._conn.execute(
            sa.update(agent_sessions)
            .where(_a.tunnel_id == tunnel.id, _a.agent_id == agent_id)
            .values(last_report_time=report.time)
        )
        return True

    async def _add_usage(self, tunnel: Tunnel, report: Report, tier: Tier) -> None:
        added: dict[str, int] = {
            "connections": report.connections,
            "bytes_in": report.bytes_in,
            "bytes_out": report.bytes_out,
            "request_count": report.request_count,
            "success_count": report.success_count,
            "error_count": report.error_count,
            "stream_milliseconds": report.stream_milliseconds,
        }
        added |= dict(zip(LATENCY_COLUMNS, report.latency_buckets, strict=True))
        stmt = self._insert_stmt(tunnel_usage).values(
            tunnel_id=tunnel.id, day=report.time.date(), user_id=tunnel.user_id,
            tunnel_name=tunnel.name, tier=tier.value, peak_concurrency=report.peak_concurrency,
            **added,
        )  # fmt: skip
        table = tunnel_usage
        update = {name: table.c[name] + stmt.excluded[name] for name in added}
        update["peak_concurrency"] = sa.case(
            (stmt.excluded.peak_concurrency > _u.peak_concurrency, stmt.excluded.peak_concurrency),
            else_=_u.peak_concurrency,
        )
        update["tier"] = stmt.excluded.tier
        await self._conn.execute(
            stmt.on_conflict_do_update(index_elements=["tunnel_id", "day"], set_=update)
        )

    async def totals(self, tunnel_id: str) -> Totals:
        stmt = sa.select(*(sa.func.coalesce(sa.func.sum(_u[c]), 0) for c in _SUMMED)).where(
            _u.tunnel_id == tunnel_id
        )
        row = (await self._conn.execute(stmt)).one()
        values = dict(zip(_SUMMED, (int(v) for v in row), strict=True))
        return Totals(
            request_count=values["request_count"],
            success_count=values["success_count"],
            error_count=values["error_count"],
            latency_buckets=tuple(values[c] for c in LATENCY_COLUMNS),
            connections=values["connections"],
            bytes_in=values["bytes_in"],
            bytes_out=values["bytes_out"],
        )

    async def user_traffic(self, user_id: str, start: date, end: date) -> tuple[int, int, int]:
        """(bytes in + out over ``start``..``end``, connections open now, stream seconds
        over ``start``..``end``) of a user."""
        transfer = sa.select(
            sa.func.coalesce(sa.func.sum(_u.bytes_in + _u.bytes_out), 0),
            sa.func.coalesce(sa.func.sum(_u.stream_milliseconds), 0),
        ).where(_u.user_id == user_id, _u.day >= start, _u.day <= end)
        active = (
            sa.select(sa.func.coalesce(sa.func.sum(_a.active_connections), 0))
            .join(tunnels, tunnels.c.id == _a.tunnel_id)
            .where(tunnels.c.user_id == user_id, _a.connected.is_(True))
        )
        used, stream_ms = (await self._conn.execute(transfer)).one()
        now_open = int((await self._conn.execute(active)).scalar_one())
        return int(used), now_open, int(stream_ms) // 1000

    async def usage(
        self, user_id: str | None, tunnel_id: str | None, start: date, end: date
    ) -> builtins.list[UsageRow]:
        stmt = sa.select(tunnel_usage).where(_u.day >= start, _u.day <= end)
        if user_id is not None:
            stmt = stmt.where(_u.user_id == user_id)
        if tunnel_id is not None:
            stmt = stmt.where(_u.tunnel_id == tunnel_id)
        rows = await self._all(stmt.order_by(_u.day, _u.tunnel_id))
        return [
            UsageRow(
                row["tunnel_id"],
                row["tunnel_name"],
                row["user_id"],
                Tier(row["tier"]),
                DailyUsage(
                    row["day"],
                    row["connections"],
                    row["bytes_in"],
                    row["bytes_out"],
                    row["peak_concurrency"],
                    row["request_count"],
                    row["stream_milliseconds"],
                ),
            )
            for row in rows
        ]
