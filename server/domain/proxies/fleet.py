"""Proxy operations for their owners, once authorization has allowed them: start, stop,
read, change the config (versioned, with rollback) and scale by hand.

Every change is one unit of work that also appends its events (outbox) and, for a config,
its revision; the fleet loop (:mod:`server.domain.proxies.upkeep`) then makes the
instances match: it places and removes them, checks them and pushes configs live.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from server.domain.audit import service as audit
from server.domain.audit.model import AuditTrail
from server.domain.common import fieldmask
from server.domain.common.clock import Clock
from server.domain.common.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PreconditionViolation,
    QuotaViolation,
    ResourceExhausted,
    Violations,
)
from server.domain.common.ids import new_id
from server.domain.common.listing import FilterField, Lister, ListSpec, OrderKey, Page
from server.domain.common.validation import display_name as check_display_name
from server.domain.events.ports import EventBus
from server.domain.events.service import record
from server.domain.proxies import config as configs
from server.domain.proxies.lifecycle import change_events, move, snapshot
from server.domain.proxies.model import (
    ConfigRevision,
    Proxy,
    ProxyConfig,
    ProxyState,
    ScalingEvent,
    ScalingTrigger,
    Transition,
)
from server.domain.unit_of_work import UnitOfWork, UnitOfWorkFactory

UPDATABLE_PATHS = frozenset(
    {"display_name", "config"}
    | {f"config.{name}" for name in ProxyConfig.__dataclass_fields__}
    | {f"config.scaling.{name}" for name in configs.SCALING_BOUNDS}
    | {"config.scaling.dry_run"}
)
PROXY_LIST_SPEC = ListSpec(
    filter_fields={
        "display_name": FilterField("string"),
        "state": FilterField("enum", frozenset(s.value for s in ProxyState)),
        "create_time": FilterField("timestamp"),
        "update_time": FilterField("timestamp"),
    },
    order_fields=frozenset({"display_name", "create_time", "update_time"}),
    default_order=(OrderKey("create_time"),),
)
NEWEST_FIRST = ListSpec(
    filter_fields={},
    order_fields=frozenset({"create_time"}),
    default_order=(OrderKey("create_time", descending=True),),
)


@dataclass(frozen=True, slots=True)
class ProxyDraft:
    """The writable part of a proxy, as a caller sent it."""

    display_name: str = ""
    config: ProxyConfig = field(default_factory=ProxyConfig)


@dataclass(frozen=True, slots=True)
class FleetSettings:
    """Limits on proxies."""

    #: Active proxies per user (stopped and failed ones do not count).
    max_per_user: int = 3


class ProxyFleet:
    """Every owner's proxy operation after authorization has allowed it."""

    def __init__(
        self,
        uow: UnitOfWorkFactory,
        bus: EventBus,
        lister: Lister,
        clock: Clock,
        settings: FleetSettings,
    ) -> None:
        self._uow = uow
        self.bus = bus
        self._lister = lister
        self._clock = clock
        self._settings = settings

    async def get(self, owner_id: str, proxy_id: str) -> Proxy:
        """A proxy of ``owner_id``."""
        async with self._uow(lag_tolerant=True) as uow:
            return await load(uow, owner_id, proxy_id)

    async def list(
        self,
        owner_id: str,
        *,
        page_size: int,
        page_token: str,
        filter: str,  # noqa: A002 - the AIP field is called filter
        order_by: str,
    ) -> Page[Proxy]:
        """A page of the owner's proxies."""
        query = self._lister.query(
            PROXY_LIST_SPEC,
            page_size=page_size,
            page_token=page_token,
            filter=filter,
            order_by=order_by,
            scope=f"proxies:{owner_id}",
        )
        async with self._uow(lag_tolerant=True) as uow:
            rows = await uow.proxies.list(owner_id, query)
        return self._lister.page(query, rows)

    async def links(self, owner_id: str) -> tuple[str, ...]:
        """Where the owner's agents link to the owner's own proxies: each placed instance
        of every proxy that serves (or is coming up)."""
        async with self._uow(lag_tolerant=True) as uow:
            found = await uow.proxies.active(owner_id)
        return tuple(i.link_address for p in found if p.active for i in p.instances)

    async def start(
        self,
        owner_id: str,
        draft: ProxyDraft,
        *,
        request_id: str,
        actor: str,
        trail: AuditTrail | None = None,
    ) -> Proxy:
        """A new proxy, ``provisioning`` with its policy's fewest instances."""
        if len(request_id) > 64:
            raise InvalidArgument.single("request_id", "at most 64 characters")
        now = self._clock.now()
        proxy_id = new_id("prx", now.timestamp())
        clean = validated(replace(draft, display_name=draft.display_name or proxy_id))
        async with self._uow() as uow:
            if request_id and (done := await uow.proxies.find_by_request(owner_id, request_id)):
                await audit.record(uow, trail, now)
                return done
            await uow.proxies.lock_owner(owner_id)
            if await uow.proxies.count_active(owner_id) >= self._settings.max_per_user:
                raise self._exhausted(owner_id)
            proxy = Proxy(
                id=proxy_id,
                user_id=owner_id,
                display_name=clean.display_name,
                state=ProxyState.PROVISIONING,
                state_reason="",
                config=clean.config,
                config_version=1,
                desired_instances=clean.config.scaling.min_instances,
                instances=(),
                version=1,
                create_time=now,
                update_time=now,
                state_time=now,
                last_active_time=now,
                request_id=request_id or None,
            )
            await uow.proxies.add(proxy)
            await uow.proxies.add_revision(ConfigRevision(proxy.id, 1, clean.config, now, actor))
            await audit.record(uow, trail, now, subject_user_id=owner_id, resource=proxy.name)
            await self.event(uow, "proxy.started", proxy, actor, snapshot(proxy))
        return proxy

    async def stop(
        self, owner_id: str, proxy_id: str, *, actor: str, trail: AuditTrail | None = None
    ) -> Proxy:
        """``stopping`` (the fleet loop removes the instances, then ``stopped``); a proxy
        already stopping, stopped or failed is returned as it is."""
        async with self._uow() as uow:
            proxy = await load(uow, owner_id, proxy_id, lock=True)
            now = self._clock.now()
            await audit.record(uow, trail, now, subject_user_id=owner_id, resource=proxy.name)
            target = move(proxy.state, Transition.STOP)
            if target is None:
                return proxy
            changed = replace(
                proxy, state=target, state_reason="stopped by the owner", state_time=now
            )
            return await self.save(uow, proxy, replace(changed, update_time=now), actor)

    async def update(
        self,
        owner_id: str,
        proxy_id: str,
        requested: ProxyDraft,
        paths: tuple[str, ...],
        *,
        etag: str,
        actor: str,
        trail: AuditTrail | None = None,
    ) -> Proxy:
        """Apply the masked paths of ``requested``, validated as a whole; a new config is a
        new revision."""
        paths = fieldmask.check_paths(paths, UPDATABLE_PATHS)
        async with self._uow() as uow:
            proxy = await load(uow, owner_id, proxy_id, lock=True)
            check_etag(proxy, etag, "proxy.etag")
            current = ProxyDraft(proxy.display_name, proxy.config)
            clean = validated(fieldmask.merge(current, requested, paths))
            now = self._clock.now()
            await audit.record(
                uow, trail, now, subject_user_id=owner_id, resource=proxy.name, paths=list(paths)
            )
            if clean == current:
                return proxy
            changed = replace(proxy, display_name=clean.display_name, update_time=now)
            if clean.config != proxy.config:
                self._must_be_live(proxy, "change the config of")
                changed = await self._new_config(uow, changed, clean.config, now, actor)
            saved = await self.save(uow, proxy, changed, actor)
            if clean.display_name != proxy.display_name:
                await self.event(uow, "proxy.updated", saved, actor, snapshot(saved))
            return saved

    async def rollback(
        self,
        owner_id: str,
        proxy_id: str,
        version: int,
        *,
        etag: str,
        actor: str,
        trail: AuditTrail | None = None,
    ) -> Proxy:
        """Make revision ``version``'s config current again, as a new revision."""
        if version < 1:
            raise InvalidArgument.single("version", "must be a revision number, from 1")
        async with self._uow() as uow:
            proxy = await load(uow, owner_id, proxy_id, lock=True)
            check_etag(proxy, etag, "etag")
            self._must_be_live(proxy, "roll back the config of")
            old = await uow.proxies.revision(proxy.id, version)
            if old is None:
                raise NotFound("config revision", f"{proxy.name}/configRevisions/{version}")
            now = self._clock.now()
            await audit.record(
                uow, trail, now, subject_user_id=owner_id, resource=proxy.name, version=version
            )
            changed = await self._new_config(
                uow, replace(proxy, update_time=now), old.config, now, actor, restored=version
            )
            return await self.save(uow, proxy, changed, actor)

    async def scale(
        self,
        owner_id: str,
        proxy_id: str,
        instances: int,
        *,
        validate_only: bool,
        actor: str,
        trail: AuditTrail | None = None,
    ) -> Proxy:
        """Set the instance count by hand, within the policy's bounds; recorded as a scaling
        event, applied unless ``validate_only`` or the policy is a dry run."""
        async with self._uow() as uow:
            proxy = await load(uow, owner_id, proxy_id, lock=True)
            policy = proxy.config.scaling
            if configs.clamp(policy, instances) != instances:
                bounds = f"{policy.min_instances} to {policy.max_instances}"
                raise InvalidArgument.single("instances", f"must be {bounds} (the policy's bounds)")
            self._must_be_live(proxy, "scale")
            now = self._clock.now()
            await audit.record(
                uow, trail, now, subject_user_id=owner_id, resource=proxy.name, instances=instances
            )
            applied = not (validate_only or policy.dry_run)
            event = ScalingEvent(
                id=new_id("pse", now.timestamp()),
                proxy_id=proxy.id,
                trigger=ScalingTrigger.MANUAL,
                from_instances=proxy.desired_instances,
                to_instances=instances,
                applied=applied,
                reason="set by hand" if applied else "set by hand (recorded only)",
                cpu_percent=-1.0,
                streams=0,
                create_time=now,
                actor=actor,
            )
            await uow.proxies.add_scaling_event(event)
            if not applied or instances == proxy.desired_instances:
                return proxy
            changed = replace(proxy, desired_instances=instances, update_time=now)
            return await self.save(uow, proxy, changed, actor)

    async def revisions(
        self, owner_id: str, proxy_id: str, *, page_size: int, page_token: str
    ) -> Page[ConfigRevision]:
        """A page of a proxy's config revisions, newest first."""
        return await self._history(
            owner_id, proxy_id, "revisions", page_size=page_size, page_token=page_token
        )

    async def scaling_events(
        self, owner_id: str, proxy_id: str, *, page_size: int, page_token: str
    ) -> Page[ScalingEvent]:
        """A page of a proxy's scaling decisions, newest first."""
        return await self._history(
            owner_id, proxy_id, "scaling_events", page_size=page_size, page_token=page_token
        )

    async def _history(
        self, owner_id: str, proxy_id: str, kind: str, *, page_size: int, page_token: str
    ) -> Page[Any]:
        """A page of one of a proxy's histories (a repository method named ``kind``)."""
        query = self._lister.query(
            NEWEST_FIRST,
            page_size=page_size,
            page_token=page_token,
            filter="",
            order_by="",
            scope=f"{kind}:{proxy_id}",
        )
        async with self._uow(readonly=True) as uow:
            await load(uow, owner_id, proxy_id)
            rows = await getattr(uow.proxies, kind)(proxy_id, query)
        return self._lister.page(query, rows)

    async def save(self, uow: UnitOfWork, before: Proxy, after: Proxy, actor: str) -> Proxy:
        """Write ``after`` over ``before`` with the events the change makes."""
        saved = await uow.proxies.save(after, before.version)
        for kind, payload in change_events(before, saved):
            await self.event(uow, kind, saved, actor, payload)
        return saved

    async def _new_config(
        self,
        uow: UnitOfWork,
        proxy: Proxy,
        config: ProxyConfig,
        now: datetime,
        actor: str,
        restored: int = 0,
    ) -> Proxy:
        version = proxy.config_version + 1
        await uow.proxies.add_revision(
            ConfigRevision(proxy.id, version, config, now, actor, restored)
        )
        desired = configs.clamp(config.scaling, proxy.desired_instances)
        return replace(proxy, config=config, config_version=version, desired_instances=desired)

    async def event(
        self, uow: UnitOfWork, kind: str, proxy: Proxy, actor: str, payload: dict[str, object]
    ) -> None:
        await record(
            uow,
            self.bus,
            self._clock,
            kind,
            subject=proxy.name,
            user_id=proxy.user_id,
            actor=actor,
            payload=dict(payload),
        )

    @staticmethod
    def _must_be_live(proxy: Proxy, doing: str) -> None:
        if proxy.active:
            return
        raise FailedPrecondition(
            f"cannot {doing} a proxy that is {proxy.state.value}",
            [PreconditionViolation("STATE", proxy.name, f"the proxy is {proxy.state.value}")],
            reason="PROXY_NOT_RUNNING",
            metadata={"state": proxy.state.value},
        )

    def _exhausted(self, owner_id: str) -> ResourceExhausted:
        limit = self._settings.max_per_user
        return ResourceExhausted(
            f"at most {limit} proxies may run at once; stop one first",
            violations=[
                QuotaViolation(
                    f"users/{owner_id}",
                    f"at most {limit} active proxies",
                    quota_id="Proxies",
                    quota_metric="tunnelplane.v1/proxies",
                    quota_value=limit,
                )
            ],
            reason="PROXY_QUOTA_EXCEEDED",
        )


def validated(draft: ProxyDraft) -> ProxyDraft:
    """``draft`` cleaned, or ``InvalidArgument`` naming every bad field."""
    violations = Violations()
    name = check_display_name(draft.display_name, "proxy.display_name", violations, 255)
    configs.validate(draft.config, violations)
    violations.raise_if_any()
    return ProxyDraft(name, draft.config)


async def load(uow: UnitOfWork, owner_id: str, proxy_id: str, *, lock: bool = False) -> Proxy:
    """The proxy ``proxy_id`` of ``owner_id``; ``NotFound`` naming it otherwise."""
    proxy = await uow.proxies.get(proxy_id, lock=lock)
    if proxy is None or proxy.user_id != owner_id:
        raise NotFound("proxy", f"users/{owner_id}/proxies/{proxy_id}")
    return proxy


def check_etag(proxy: Proxy, etag: str, field: str) -> None:
    """``Aborted`` if ``etag`` is given and is not the proxy's (AIP-154)."""
    if etag and etag != proxy.etag:
        raise Aborted(
            "the proxy changed since it was read; read it again",
            reason="ETAG_MISMATCH",
            metadata={"field": field},
        )
