"""Tunnel operations, once authorization has allowed them.

Every change is one unit of work that also appends its event (outbox), so a change and its
event exist together or not at all; watchers hear about it once it has committed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from server.domain.audit import service as audit
from server.domain.audit.model import AuditTrail
from server.domain.common import fieldmask
from server.domain.common.clock import Clock
from server.domain.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    PreconditionViolation,
    ResourceExhausted,
)
from server.domain.common.ids import new_id
from server.domain.common.listing import Lister, Page
from server.domain.events.ports import EventBus
from server.domain.events.service import record
from server.domain.identity.model import Tier, TierLimits
from server.domain.identity.tiers import TierCatalog
from server.domain.limits.rules import month_bounds
from server.domain.tunnels.model import (
    Endpoint,
    Status,
    Transition,
    Tunnel,
    TunnelDraft,
    TunnelHealth,
    TunnelState,
)
from server.domain.tunnels.ports import PasswordHashing
from server.domain.tunnels.rules import (
    TUNNEL_LIST_SPEC,
    active_endpoint,
    change_events,
    check_draft,
    check_etag,
    draft_of,
    failover_target,
    owned,
    probe_now,
    refreshed,
    snapshot,
    stop_reason,
    stream_time_exhausted,
    transfer_exhausted,
    transition,
    tunnels_exhausted,
)
from server.domain.tunnels.web_access import sealed, with_stored_hash
from server.domain.unit_of_work import UnitOfWork, UnitOfWorkFactory

#: Where listen ports are drawn from: a generator of its own, never the global ``random``
#: that a test framework may seed (hypothesis does, making every example draw the same
#: 32 ports until they are all taken).
_PORTS = random.SystemRandom()

UPDATABLE_PATHS = frozenset(
    {
        "display_name",
        "description",
        "config",
        "config.max_connections",
        "config.idle_timeout",
        "config.compression",
        "config.web_access",
        "config.allowed_networks",
        "config.basic_username",
        "config.basic_password",
        "endpoints",
    }
)


@dataclass(frozen=True, slots=True)
class TunnelSettings:
    """Tunnel settings."""

    listen_host: str = "127.0.0.1"
    port_min: int = 20000
    port_max: int = 29999
    max_endpoints: int = 10


class TunnelService:
    """Every tunnel operation after authorization has allowed it."""

    def __init__(
        self,
        uow: UnitOfWorkFactory,
        bus: EventBus,
        lister: Lister,
        tiers: TierCatalog,
        clock: Clock,
        settings: TunnelSettings,
        hasher: PasswordHashing,
    ) -> None:
        self._uow = uow
        self._hasher = hasher
        self.bus = bus
        self._lister = lister
        self._tiers = tiers
        self._clock = clock
        self.settings = settings

    def tier_limits(self, tier: Tier) -> TierLimits:
        """The limits of ``tier``."""
        return self._tiers.limits(tier)

    def listen_address(self, tunnel: Tunnel) -> str:
        """Where the tunnel's agents listen."""
        return f"{self.settings.listen_host}:{tunnel.listen_port}"

    async def get(self, owner_id: str, tunnel_id: str) -> Tunnel:
        """A tunnel of ``owner_id``."""
        async with self._uow(lag_tolerant=True) as uow:
            return await _load(uow, owner_id, tunnel_id)

    async def list(
        self,
        owner_id: str,
        *,
        page_size: int,
        page_token: str,
        filter: str,  # noqa: A002 - the AIP field is called filter
        order_by: str,
    ) -> Page[Tunnel]:
        """A page of the owner's tunnels."""
        query = self._lister.query(
            TUNNEL_LIST_SPEC,
            page_size=page_size,
            page_token=page_token,
            filter=filter,
            order_by=order_by,
            scope=f"owner={owner_id}",
        )
        async with self._uow(lag_tolerant=True) as uow:
            rows = await uow.tunnels.list(owner_id, query)
        return self._lister.page(query, rows)

    async def create(
        self,
        owner_id: str,
        tier: Tier,
        draft: TunnelDraft,
        *,
        request_id: str,
        actor: str,
        trail: AuditTrail | None = None,
    ) -> Tunnel:
        """A new tunnel in the ``created`` state, within the tier's tunnel quota."""
        if len(request_id) > 64:
            raise InvalidArgument.single("request_id", "at most 64 characters")
        clean = await self._checked(draft, tier)
        now = self._clock.now()
        async with self._uow() as uow:
            if request_id and (done := await uow.tunnels.find_by_request(owner_id, request_id)):
                await audit.record(uow, trail, now)
                return done
            await uow.tunnels.lock_owner(owner_id)
            await self._check_quota(uow, owner_id, tier)
            if await uow.tunnels.name_taken(owner_id, clean.display_name):
                raise AlreadyExists("tunnel", clean.display_name)
            tunnel = Tunnel(
                id=new_id("tun", now.timestamp()),
                user_id=owner_id,
                display_name=clean.display_name,
                description=clean.description,
                status=Status(TunnelState.CREATED, running=False),
                health=TunnelHealth.UNKNOWN,
                config=clean.config,
                endpoints=tuple(Endpoint(spec) for spec in clean.endpoints),
                active_endpoint="",
                listen_port=await self._free_port(uow),
                connected_agents=0,
                lost_agents=0,
                version=1,
                create_time=now,
                update_time=now,
                state_time=now,
                request_id=request_id or None,
            )
            tunnel = replace(tunnel, active_endpoint=active_endpoint(tunnel))
            await uow.tunnels.add(tunnel)
            await audit.record(uow, trail, now, subject_user_id=owner_id, resource=tunnel.name)
            await record(
                uow,
                self.bus,
                self._clock,
                "tunnel.created",
                subject=tunnel.name,
                user_id=owner_id,
                actor=actor,
                payload=snapshot(tunnel),
            )
        return tunnel

    async def update(
        self,
        owner_id: str,
        tunnel_id: str,
        tier: Tier,
        requested: TunnelDraft,
        paths: tuple[str, ...],
        *,
        etag: str,
        actor: str,
        trail: AuditTrail | None = None,
    ) -> Tunnel:
        """Apply the masked paths of ``requested``; validated as a whole."""
        paths = fieldmask.check_paths(paths, UPDATABLE_PATHS)
        async with self._uow() as uow:
            tunnel = await _load(uow, owner_id, tunnel_id, lock=True)
            check_etag(tunnel, etag, "tunnel.etag")
            merged = fieldmask.merge(draft_of(tunnel), requested, paths)
            merged = replace(merged, config=with_stored_hash(merged.config, tunnel.config))
            # A new basic password is hashed here, with the row locked: such updates are rare.
            clean = await self._checked(merged, tier)
            now = self._clock.now()
            if clean == draft_of(tunnel):
                await audit.record(uow, trail, now)
                return tunnel
            if clean.display_name != tunnel.display_name and await uow.tunnels.name_taken(
                owner_id, clean.display_name, tunnel.id
            ):
                raise AlreadyExists("tunnel", clean.display_name)
            kept = {e.spec.url: e for e in tunnel.endpoints}
            endpoints = tuple(
                replace(kept[s.url], spec=s) if s.url in kept else Endpoint(s)
                for s in clean.endpoints
            )
            changed = replace(
                tunnel,
                display_name=clean.display_name,
                description=clean.description,
                config=clean.config,
                endpoints=endpoints,
                update_time=now,
            )
            changed = refreshed(changed)
            await audit.record(
                uow, trail, now, subject_user_id=owner_id, resource=tunnel.name, paths=list(paths)
            )
            saved = await uow.tunnels.save(changed, tunnel.version)
            await self._emit_changes(uow, tunnel, saved, actor, "tunnel.updated")
        return saved

    async def delete(
        self,
        owner_id: str,
        tunnel_id: str,
        *,
        force: bool,
        etag: str,
        actor: str,
        trail: AuditTrail | None = None,
    ) -> Tunnel:
        """Delete; refused while connected unless ``force``."""
        async with self._uow() as uow:
            tunnel = await _load(uow, owner_id, tunnel_id, lock=True)
            check_etag(tunnel, etag, "etag")
            if tunnel.state is TunnelState.CONNECTED and not force:
                raise FailedPrecondition(
                    "the tunnel is connected; stop it first or delete with force",
                    [PreconditionViolation("STATE", "tunnel", "the tunnel is connected")],
                    reason="TUNNEL_CONNECTED",
                    metadata={"state": tunnel.state.value},
                )
            await uow.tunnels.delete(tunnel_id)
            await audit.record(
                uow,
                trail,
                self._clock.now(),
                subject_user_id=owner_id,
                resource=tunnel.name,
                force=force,
            )
            await record(
                uow,
                self.bus,
                self._clock,
                "tunnel.deleted",
                subject=tunnel.name,
                user_id=owner_id,
                actor=actor,
                payload=snapshot(tunnel),
            )
        return tunnel

    async def start(
        self,
        owner_id: str,
        tunnel_id: str,
        tier: Tier,
        *,
        actor: str,
        trail: AuditTrail | None = None,
    ) -> Tunnel:
        """``created``/``disconnected``/``error`` → ``connecting`` (or ``connected``);
        refused while the owner's monthly transfer or stream time is used up."""
        async with self._uow(readonly=True) as uow:
            await self.check_transfer(uow, owner_id, tier)
        return await self._move(owner_id, tunnel_id, Transition.START, actor=actor, trail=trail)

    async def check_transfer(self, uow: UnitOfWork, owner_id: str, tier: Tier) -> None:
        """``ResourceExhausted`` naming the quota if the month's transfer or stream time is
        used up."""
        limits, now = self._tiers.limits(tier), self._clock.now()
        start, end = month_bounds(now)
        last = (end - timedelta(days=1)).date()
        used, _, streamed = await uow.agents.user_traffic(owner_id, start.date(), last)
        if 0 <= limits.transfer_bytes_per_month <= used:
            raise transfer_exhausted(owner_id, tier, limits.transfer_bytes_per_month, now)
        if 0 <= limits.stream_seconds_per_month <= streamed:
            raise stream_time_exhausted(owner_id, tier, limits.stream_seconds_per_month, now)

    async def stop(
        self, owner_id: str, tunnel_id: str, *, actor: str, trail: AuditTrail | None = None
    ) -> Tunnel:
        """A started tunnel → ``disconnected``; its agents are told to stop."""
        reason = stop_reason(owner_id, actor)
        return await self._move(
            owner_id, tunnel_id, Transition.STOP, actor=actor, reason=reason, trail=trail
        )

    async def fail(self, owner_id: str, tunnel_id: str, reason: str) -> Tunnel:
        """Any state → ``error`` with ``reason`` (the system noticed something wrong)."""
        return await self._move(owner_id, tunnel_id, Transition.FAIL, actor="", reason=reason)

    async def failover(
        self,
        owner_id: str,
        tunnel_id: str,
        url: str,
        *,
        force: bool,
        actor: str,
        trail: AuditTrail | None = None,
    ) -> Tunnel:
        """Switch traffic to ``url`` (or the next best endpoint) now."""
        async with self._uow() as uow:
            tunnel = await _load(uow, owner_id, tunnel_id, lock=True)
            target = failover_target(tunnel, url, force=force)
            now = self._clock.now()
            changed = replace(tunnel, active_endpoint=target, update_time=now)
            saved = await uow.tunnels.save(changed, tunnel.version)
            await audit.record(uow, trail, now)
            await record(
                uow,
                self.bus,
                self._clock,
                "tunnel.failover",
                subject=tunnel.name,
                user_id=owner_id,
                actor=actor,
                payload=snapshot(saved)
                | {"from": tunnel.active_endpoint, "to": target, "reason": "manual"},
            )
        return saved

    async def agents_changed(
        self, tunnel_id: str, connected: int, lost: int, reason: str = ""
    ) -> Tunnel | None:
        """Agents came or went: move the state and health, with their events; ``reason``
        says why a tunnel left without agents is disconnected."""
        async with self._uow() as uow:
            tunnel = await uow.tunnels.get(tunnel_id, lock=True)
            if tunnel is None:
                return None
            event = Transition.AGENT_UP if connected else Transition.AGENT_DOWN
            status = transition(tunnel.status, event, agents=connected, reason=reason)
            changed = replace(tunnel, connected_agents=connected, lost_agents=lost)
            changed = refreshed(self._with_status(changed, status))
            if changed == tunnel:
                return tunnel
            saved = await uow.tunnels.save(changed, tunnel.version)
            await self._emit_changes(uow, tunnel, saved, "", None)
        return saved

    async def probed(
        self, tunnel_id: str, url: str, apply: Any, next_probe: datetime
    ) -> Tunnel | None:
        """Record a probe of one endpoint (``apply`` maps the old endpoint to the new);
        fail over or back when the choice of endpoint changes."""
        async with self._uow() as uow:
            tunnel = await uow.tunnels.get(tunnel_id, lock=True)
            if tunnel is None or all(e.spec.url != url for e in tunnel.endpoints):
                return None
            before = next(e for e in tunnel.endpoints if e.spec.url == url)
            after = replace(apply(before), next_probe_time=next_probe)
            endpoints = tuple(after if e.spec.url == url else e for e in tunnel.endpoints)
            changed = refreshed(replace(tunnel, endpoints=endpoints))
            moved = after.health is not before.health
            if not moved and (changed.health, changed.active_endpoint) == (
                tunnel.health,
                tunnel.active_endpoint,
            ):
                # Probe bookkeeping only: the tunnel did not change (nor does its etag).
                await uow.tunnels.save_endpoint(tunnel.id, after)
                return changed
            saved = await uow.tunnels.save(changed, tunnel.version)
            await self._emit_changes(
                uow, tunnel, saved, "", "tunnel.health_changed" if moved else None
            )
        return saved

    # -- helpers ---------------------------------------------------------------------------

    async def _move(
        self,
        owner_id: str,
        tunnel_id: str,
        event: Transition,
        *,
        actor: str,
        reason: str = "",
        trail: AuditTrail | None = None,
    ) -> Tunnel:
        async with self._uow() as uow:
            tunnel = await _load(uow, owner_id, tunnel_id, lock=True)
            status = transition(tunnel.status, event, agents=tunnel.connected_agents, reason=reason)
            changed = refreshed(self._with_status(tunnel, status))
            if event is Transition.START:
                changed = probe_now(changed)
            await audit.record(
                uow, trail, self._clock.now(), subject_user_id=owner_id, resource=tunnel.name
            )
            saved = await uow.tunnels.save(changed, tunnel.version)
            await self._emit_changes(uow, tunnel, saved, actor, None)
        return saved

    def _with_status(self, tunnel: Tunnel, status: Status) -> Tunnel:
        if status == tunnel.status:
            return tunnel
        now = self._clock.now()
        moved = status.state is not tunnel.state
        return replace(
            tunnel, status=status, update_time=now, state_time=now if moved else tunnel.state_time
        )

    async def _emit_changes(
        self, uow: UnitOfWork, before: Tunnel, after: Tunnel, actor: str, other: str | None
    ) -> None:
        """Record the events of a change (:func:`change_events`), else ``other`` (if given)."""
        emitted = change_events(before, after)
        if not emitted and other is not None:
            emitted = [(other, snapshot(after))]
        for type_, payload in emitted:
            await record(
                uow,
                self.bus,
                self._clock,
                type_,
                subject=after.name,
                user_id=after.user_id,
                actor=actor,
                payload=payload,
            )

    async def _checked(self, draft: TunnelDraft, tier: Tier) -> TunnelDraft:
        """The draft validated, with a new basic password replaced by its hash."""
        limits, features = self._tiers.limits(tier), self._tiers.features(tier)
        clean = check_draft(
            draft, tier, limits, features, max_endpoints=self.settings.max_endpoints
        )
        if not clean.config.basic_password:
            return clean
        hashed = await self._hasher.hash(clean.config.basic_password)
        return replace(clean, config=sealed(clean.config, hashed))

    async def _check_quota(self, uow: UnitOfWork, owner_id: str, tier: Tier) -> None:
        limit = self._tiers.limits(tier).max_tunnels
        if limit >= 0 and await uow.tunnels.count(owner_id) >= limit:
            raise tunnels_exhausted(owner_id, tier, limit)

    async def _free_port(self, uow: UnitOfWork) -> int:
        low, high = self.settings.port_min, self.settings.port_max
        for _ in range(32):
            port = _PORTS.randint(low, high)
            if not await uow.tunnels.port_taken(port):
                return port
        raise ResourceExhausted("no listen port is free; try again", retry_after=1.0)


async def _load(uow: UnitOfWork, owner_id: str, tunnel_id: str, *, lock: bool = False) -> Tunnel:
    return owned(await uow.tunnels.get(tunnel_id, lock=lock), owner_id, tunnel_id)
