"""Proxies with their config revisions and scaling events in SQL."""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from dataclasses import asdict, fields, replace
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from server.domain.common.listing import ListQuery
from server.domain.proxies.model import (
    ACTIVE_STATES,
    ConfigRevision,
    HealthCheck,
    Instance,
    InstanceHealth,
    Proxy,
    ProxyConfig,
    ProxyState,
    ScalingEvent,
    ScalingPolicy,
    ScalingTrigger,
)
from server.storage.base import Repository
from server.storage.proxies.tables import proxies, proxy_config_revisions, proxy_scaling_events
from server.storage.query import apply_list_query
from server.storage.tables import users

_p = proxies.c
_r = proxy_config_revisions.c
_s = proxy_scaling_events.c

PROXY_COLUMNS = {
    "display_name": _p.display_name,
    "state": _p.state,
    "create_time": _p.create_time,
    "update_time": _p.update_time,
}
REVISION_COLUMNS = {"create_time": _r.create_time}
SCALING_COLUMNS = {"create_time": _s.create_time}


def config_to_json(config: ProxyConfig) -> dict[str, Any]:
    """The stored form of a config."""
    return asdict(config)


def config_from_json(data: dict[str, Any]) -> ProxyConfig:
    """A stored config; keys it does not know are ignored, missing ones take defaults (so
    a config written by another release still reads)."""
    known = {f.name for f in fields(ProxyConfig)} - {"scaling"}
    policy_known = {f.name for f in fields(ScalingPolicy)}
    scaling = {k: v for k, v in dict(data.get("scaling") or {}).items() if k in policy_known}
    return ProxyConfig(
        **{k: v for k, v in data.items() if k in known},
        scaling=ScalingPolicy(**scaling),
    )


def _time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _instance_json(i: Instance) -> dict[str, Any]:
    out = asdict(i)
    out["health"] = i.health.value
    for key in ("start_time", "last_check_time"):
        value = out[key]
        out[key] = None if value is None else value.isoformat()
    out["checks"] = [[c.time.isoformat(), c.ok, c.error] for c in i.checks]
    return out


def _instance(data: dict[str, Any]) -> Instance:
    return Instance(
        id=str(data["id"]),
        public_url=str(data["public_url"]),
        link_address=str(data["link_address"]),
        admin_url=str(data["admin_url"]),
        health=InstanceHealth(data.get("health", "unknown")),
        failures=int(data.get("failures", 0)),
        successes=int(data.get("successes", 0)),
        restarts=int(data.get("restarts", 0)),
        start_time=_time(data.get("start_time")),
        last_check_time=_time(data.get("last_check_time")),
        last_error=str(data.get("last_error", "")),
        checks=tuple(
            HealthCheck(datetime.fromisoformat(t), bool(ok), str(error))
            for t, ok, error in data.get("checks", ())
        ),
    )


def _proxy(row: sa.RowMapping) -> Proxy:
    return Proxy(
        id=row["id"],
        user_id=row["user_id"],
        display_name=row["display_name"],
        state=ProxyState(row["state"]),
        state_reason=row["state_reason"],
        config=config_from_json(row["config"]),
        config_version=row["config_version"],
        desired_instances=row["desired_instances"],
        instances=tuple(_instance(i) for i in row["instances"]),
        version=row["version"],
        create_time=row["create_time"],
        update_time=row["update_time"],
        state_time=row["state_time"],
        last_active_time=row["last_active_time"],
        request_id=row["request_id"],
    )


def _columns(proxy: Proxy) -> dict[str, Any]:
    return {
        "display_name": proxy.display_name,
        "state": proxy.state.value,
        "state_reason": proxy.state_reason[:300],
        "config": config_to_json(proxy.config),
        "config_version": proxy.config_version,
        "desired_instances": proxy.desired_instances,
        "instances": [_instance_json(i) for i in proxy.instances],
        "update_time": proxy.update_time,
        "state_time": proxy.state_time,
        "last_active_time": proxy.last_active_time,
    }


def _revision(row: sa.RowMapping) -> ConfigRevision:
    return ConfigRevision(
        proxy_id=row["proxy_id"],
        version=row["version"],
        config=config_from_json(row["config"]),
        create_time=row["create_time"],
        actor=row["actor"],
        rolled_back_from=row["restored_version"],
    )


def _scaling(row: sa.RowMapping) -> ScalingEvent:
    return ScalingEvent(
        id=row["id"],
        proxy_id=row["proxy_id"],
        trigger=ScalingTrigger(row["trigger"]),
        from_instances=row["from_instances"],
        to_instances=row["to_instances"],
        applied=row["applied"],
        reason=row["reason"],
        cpu_percent=row["cpu_percent"],
        streams=row["streams"],
        create_time=row["create_time"],
        actor=row["actor"],
    )


class SqlProxyRepository(Repository):
    """Proxies with their config revisions and scaling events in SQL."""

    async def get(self, proxy_id: str, *, lock: bool = False) -> Proxy | None:
        stmt = sa.select(proxies).where(_p.id == proxy_id)
        if lock:
            stmt = stmt.with_for_update()
        row = await self._one(stmt)
        return None if row is None else _proxy(row)

    async def find_by_request(self, user_id: str, request_id: str) -> Proxy | None:
        stmt = sa.select(proxies).where(_p.user_id == user_id, _p.request_id == request_id)
        row = await self._one(stmt)
        return None if row is None else _proxy(row)

    async def lock_owner(self, user_id: str) -> None:
        """Serialise writes that check the per-owner limit (no-op on SQLite's one writer)."""
        await self._conn.execute(
            sa.select(users.c.id).where(users.c.id == user_id).with_for_update()
        )

    async def count_active(self, user_id: str) -> int:
        stmt = (
            sa.select(sa.func.count())
            .select_from(proxies)
            .where(_p.user_id == user_id, _p.state.in_([s.value for s in ACTIVE_STATES]))
        )
        return int((await self._conn.execute(stmt)).scalar_one())

    async def add(self, proxy: Proxy) -> None:
        values = _columns(proxy) | {
            "id": proxy.id,
            "user_id": proxy.user_id,
            "request_id": proxy.request_id,
            "version": proxy.version,
            "create_time": proxy.create_time,
        }
        await self._insert(proxies, values, "proxy", proxy.name)

    async def save(self, proxy: Proxy, expected_version: int) -> Proxy:
        """Write every mutable column; ``Aborted`` if the version moved."""
        values = _columns(proxy) | {"version": expected_version + 1}
        await self._update_versioned(
            proxies, proxy.id, expected_version, values, "proxy", proxy.name
        )
        return replace(proxy, version=expected_version + 1)

    async def save_instances(
        self, proxy_id: str, instances: Sequence[Instance], last_active_time: datetime
    ) -> None:
        values = {
            "instances": [_instance_json(i) for i in instances],
            "last_active_time": last_active_time,
        }
        await self._conn.execute(sa.update(proxies).where(_p.id == proxy_id).values(**values))

    async def list(self, user_id: str, query: ListQuery) -> builtins.list[Proxy]:
        stmt = sa.select(proxies).where(_p.user_id == user_id)
        stmt = apply_list_query(stmt, query, PROXY_COLUMNS, _p.id)
        return [_proxy(row) for row in await self._all(stmt)]

    async def active(self, user_id: str = "") -> builtins.list[Proxy]:
        """Proxies not stopped or failed (those stopping included): of ``user_id``, or of
        every user (the fleet loop's work)."""
        final = [ProxyState.STOPPED.value, ProxyState.FAILED.value]
        stmt = sa.select(proxies).where(_p.state.not_in(final)).order_by(_p.id)
        if user_id:
            stmt = stmt.where(_p.user_id == user_id)
        return [_proxy(row) for row in await self._all(stmt)]

    async def add_revision(self, revision: ConfigRevision) -> None:
        values = {
            "proxy_id": revision.proxy_id,
            "version": revision.version,
            "config": config_to_json(revision.config),
            "actor": revision.actor,
            "restored_version": revision.rolled_back_from,
            "create_time": revision.create_time,
        }
        await self._insert(proxy_config_revisions, values, "config revision", str(revision.version))

    async def revision(self, proxy_id: str, version: int) -> ConfigRevision | None:
        stmt = sa.select(proxy_config_revisions).where(
            _r.proxy_id == proxy_id, _r.version == version
        )
        row = await self._one(stmt)
        return None if row is None else _revision(row)

    async def revisions(self, proxy_id: str, query: ListQuery) -> builtins.list[ConfigRevision]:
        stmt = sa.select(proxy_config_revisions).where(_r.proxy_id == proxy_id)
        stmt = apply_list_query(stmt, query, REVISION_COLUMNS, _r.version)
        return [_revision(row) for row in await self._all(stmt)]

    async def add_scaling_event(self, event: ScalingEvent) -> None:
        values = {
            "id": event.id,
            "proxy_id": event.proxy_id,
            "trigger": event.trigger.value,
            "from_instances": event.from_instances,
            "to_instances": event.to_instances,
            "applied": event.applied,
            "reason": event.reason[:300],
            "cpu_percent": event.cpu_percent,
            "streams": event.streams,
            "actor": event.actor,
            "create_time": event.create_time,
        }
        await self._insert(proxy_scaling_events, values, "scaling event", event.id)

    async def scaling_events(self, proxy_id: str, query: ListQuery) -> builtins.list[ScalingEvent]:
        stmt = sa.select(proxy_scaling_events).where(_s.proxy_id == proxy_id)
        stmt = apply_list_query(stmt, query, SCALING_COLUMNS, _s.id)
        return [_scaling(row) for row in await self._all(stmt)]

    async def last_scaling(self, proxy_id: str, applied_only: bool = True) -> ScalingEvent | None:
        stmt = sa.select(proxy_scaling_events).where(_s.proxy_id == proxy_id)
        if applied_only:
            stmt = stmt.where(_s.applied == sa.true())
        row = await self._one(stmt.order_by(_s.create_time.desc(), _s.id.desc()).limit(1))
        return None if row is None else _scaling(row)
