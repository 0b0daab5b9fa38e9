"""Tunnels and their endpoints in SQL."""

from __future__ import annotations

import builtins
from dataclasses import replace
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from server.domain.common.listing import ListQuery
from server.domain.tunnels.model import (
    Endpoint,
    EndpointHealth,
    EndpointSpec,
    Status,
    Tunnel,
    TunnelConfig,
    TunnelHealth,
    TunnelState,
    WebAccess,
)
from server.storage.base import Repository
from server.storage.query import apply_list_query
from server.storage.tables import tunnel_endpoints, tunnels, users

_t = tunnels.c
_e = tunnel_endpoints.c

TUNNEL_COLUMNS = {
    "display_name": _t.display_name,
    "state": _t.state,
    "health": _t.health,
    "create_time": _t.create_time,
    "update_time": _t.update_time,
}


def config_to_json(config: TunnelConfig) -> dict[str, Any]:
    """The stored form of a configuration."""
    return {
        "max_connections": config.max_connections,
        "idle_timeout": config.idle_timeout,
        "compression": config.compression,
        "web_access": config.web_access.value,
        "allowed_networks": list(config.allowed_networks),
        "basic_username": config.basic_username,
        # The hash only: a password as given never reaches storage.
        "basic_password_hash": config.basic_password_hash,
    }


def _config(data: dict[str, Any]) -> TunnelConfig:
    # Configs stored before web access existed have none of its keys: private, no networks;
    # those stored before basic access, no basic credentials.
    return TunnelConfig(
        int(data.get("max_connections", 0)),
        float(data.get("idle_timeout", 60.0)),
        bool(data.get("compression", False)),
        WebAccess(data.get("web_access", WebAccess.PRIVATE.value)),
        tuple(str(n) for n in data.get("allowed_networks", ())),
        basic_username=str(data.get("basic_username", "")),
        basic_password_hash=str(data.get("basic_password_hash", "")),
    )


def _endpoint(row: sa.RowMapping) -> Endpoint:
    return Endpoint(
        EndpointSpec(row["url"], row["priority"], row["weight"]),
        EndpointHealth(row["health"]),
        row["failures"],
        row["successes"],
        row["last_probe_time"],
        row["last_error"],
        row["next_probe_time"],
    )


def _tunnel(row: sa.RowMapping, endpoints: tuple[Endpoint, ...]) -> Tunnel:
    return Tunnel(
        id=row["id"],
        user_id=row["user_id"],
        display_name=row["display_name"],
        description=row["description"],
        status=Status(TunnelState(row["state"]), row["running"], row["state_reason"]),
        health=TunnelHealth(row["health"]),
        config=_config(row["config"]),
        endpoints=endpoints,
        active_endpoint=row["active_endpoint"],
        listen_port=row["listen_port"],
        connected_agents=row["connected_agents"],
        lost_agents=row["lost_agents"],
        version=row["version"],
        create_time=row["create_time"],
        update_time=row["update_time"],
        state_time=row["state_time"],
        request_id=row["request_id"],
    )


def _columns(tunnel: Tunnel) -> dict[str, Any]:
    return {
        "display_name": tunnel.display_name,
        "description": tunnel.description,
        "state": tunnel.status.state.value,
        "running": tunnel.status.running,
        "state_reason": tunnel.status.reason[:300],
        "health": tunnel.health.value,
        "config": config_to_json(tunnel.config),
        "active_endpoint": tunnel.active_endpoint,
        "connected_agents": tunnel.connected_agents,
        "lost_agents": tunnel.lost_agents,
        "update_time": tunnel.update_time,
        "state_time": tunnel.state_time,
    }


class SqlTunnelRepository(Repository):
    """Tunnels and their endpoints in SQL."""

    async def get(self, tunnel_id: str, *, lock: bool = False) -> Tunnel | None:
        stmt = sa.select(tunnels).where(_t.id == tunnel_id)
        if lock:
            stmt = stmt.with_for_update()
        row = await self._one(stmt)
        if row is None:
            return None
        return _tunnel(row, await self._endpoints(tunnel_id))

    async def find_by_request(self, user_id: str, request_id: str) -> Tunnel | None:
        row = await self._one(
            sa.select(_t.id).where(_t.user_id == user_id, _t.request_id == request_id)
        )
        return None if row is None else await self.get(row["id"])

    async def name_taken(self, user_id: str, display_name: str, except_id: str = "") -> bool:
        stmt = sa.select(_t.id).where(_t.user_id == user_id, _t.display_name == display_name)
        return any(row["id"] != except_id for row in await self._all(stmt))

    async def port_taken(self, port: int) -> bool:
        return await self._one(sa.select(_t.id).where(_t.listen_port == port)) is not None

    async def count(self, user_id: str) -> int:
        stmt = sa.select(sa.func.count()).select_from(tunnels).where(_t.user_id == user_id)
        return int((await self._conn.execute(stmt)).scalar_one())

    async def lock_owner(self, user_id: str) -> None:
        """Serialise writes that check a per-owner quota (no-op on SQLite's one writer)."""
        await self._conn.execute(
            sa.select(users.c.id).where(users.c.id == user_id).with_for_update()
        )

    async def add(self, tunnel: Tunnel) -> None:
        values = _columns(tunnel) | {
            "id": tunnel.id,
            "user_id": tunnel.user_id,
            "listen_port": tunnel.listen_port,
            "request_id": tunnel.request_id,
            "version": tunnel.version,
            "create_time": tunnel.create_time,
        }
        await self._insert(tunnels, values, "tunnel", tunnel.name)
        await self._put_endpoints(tunnel.id, tunnel.endpoints, tunnel.create_time)

    async def save(self, tunnel: Tunnel, expected_version: int) -> Tunnel:
        """Write every mutable column and the endpoints; ``Aborted`` if the version moved."""
        values = _columns(tunnel) | {"version": expected_version + 1}
        await self._update_versioned(
            tunnels, tunnel.id, expected_version, values, "tunnel", tunnel.name
        )
        await self._conn.execute(sa.delete(tunnel_endpoints).where(_e.tunnel_id == tunnel.id))
        await self._put_endpoints(tunnel.id, tunnel.endpoints, tunnel.update_time)
        return replace(tunnel, version=expected_version + 1)  # what was written: no re-read

    async def save_endpoint(self, tunnel_id: str, endpoint: Endpoint) -> None:
        """Write one endpoint's probe bookkeeping (the tunnel's version stays)."""
        await self._conn.execute(
            sa.update(tunnel_endpoints)
            .where(_e.tunnel_id == tunnel_id, _e.url == endpoint.spec.url)
            .values(
                health=endpoint.health.value,
                failures=endpoint.failures,
                successes=endpoint.successes,
                last_probe_time=endpoint.last_probe_time,
                last_error=endpoint.last_error,
                next_probe_time=endpoint.next_probe_time,
            )
        )

    async def delete(self, tunnel_id: str) -> None:
        await self._conn.execute(sa.delete(tunnels).where(_t.id == tunnel_id))

    async def list(self, user_id: str, query: ListQuery) -> builtins.list[Tunnel]:
        stmt = sa.select(tunnels).where(_t.user_id == user_id)
        stmt = apply_list_query(stmt, query, TUNNEL_COLUMNS, _t.id)
        return await self._with_endpoints(await self._all(stmt))

    async def by_ids(self, tunnel_ids: builtins.list[str]) -> builtins.list[Tunnel]:
        if not tunnel_ids:
            return []
        rows = await self._all(sa.select(tunnels).where(_t.id.in_(tunnel_ids)))
        return await self._with_endpoints(rows)

    async def due_probes(self, now: datetime, limit: int) -> builtins.list[tuple[str, str]]:
        """(tunnel id, url) of endpoints whose next probe is due, oldest first; only those of
        started tunnels (not failed ones): nothing else sends traffic to an endpoint."""
        stmt = (
            sa.select(_e.tunnel_id, _e.url)
            .join(tunnels, _t.id == _e.tunnel_id)
            .where(
                _e.next_probe_time <= now,
                _t.running == sa.true(),
                _t.state != TunnelState.ERROR.value,
            )
            .order_by(_e.next_probe_time)
            .limit(limit)
        )
        return [(row["tunnel_id"], row["url"]) for row in await self._all(stmt)]

    async def claim_probe(self, tunnel_id: str, url: str, now: datetime, until: datetime) -> bool:
        """Push the endpoint's next probe to ``until`` if it is still due (one replica wins)."""
        stmt = (
            sa.update(tunnel_endpoints)
            .where(_e.tunnel_id == tunnel_id, _e.url == url, _e.next_probe_time <= now)
            .values(next_probe_time=until)
        )
        return bool((await self._conn.execute(stmt)).rowcount)

    async def _with_endpoints(self, rows: builtins.list[sa.RowMapping]) -> builtins.list[Tunnel]:
        ids = [row["id"] for row in rows]
        grouped: dict[str, builtins.list[Endpoint]] = {i: [] for i in ids}
        if ids:
            stmt = sa.select(tunnel_endpoints).where(_e.tunnel_id.in_(ids)).order_by(_e.position)
            for row in await self._all(stmt):
                grouped[row["tunnel_id"]].append(_endpoint(row))
        return [_tunnel(row, tuple(grouped[row["id"]])) for row in rows]

    async def _endpoints(self, tunnel_id: str) -> tuple[Endpoint, ...]:
        stmt = sa.select(tunnel_endpoints).where(_e.tunnel_id == tunnel_id).order_by(_e.position)
        return tuple(_endpoint(row) for row in await self._all(stmt))

    async def _put_endpoints(
        self, tunnel_id: str, endpoints: tuple[Endpoint, ...], now: datetime
    ) -> None:
        if not endpoints:
            return
        rows = [
            {
                "tunnel_id": tunnel_id,
                "position": index,
                "url": e.spec.url,
                "priority": e.spec.priority,
                "weight": e.spec.weight,
                "health": e.health.value,
                "failures": e.failures,
                "successes": e.successes,
                "last_probe_time": e.last_probe_time,
                "last_error": e.last_error,
                "next_probe_time": e.next_probe_time or now,
            }
            for index, e in enumerate(endpoints)
        ]
        await self._conn.execute(tunnel_endpoints.insert(), rows)
