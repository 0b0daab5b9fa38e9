"""What a proxy's owner can learn of it beyond its record: its traffic (asked of each
instance now, and added up) and the diagnostics bundle."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from server.domain.common.clock import Clock
from server.domain.common.listing import Lister
from server.domain.proxies.fleet import NEWEST_FIRST, load
from server.domain.proxies.model import ConfigRevision, Instance, Proxy, ScalingEvent
from server.domain.proxies.ports import InstanceAdmin, InstanceUnreachableError
from server.domain.unit_of_work import UnitOfWorkFactory

#: Seconds an instance has to answer a question of the owner's.
ASK_WITHIN = 3.0
Buckets = tuple[tuple[float, float], ...]  # (upper bound, cumulative count); inf last


@dataclass(frozen=True, slots=True)
class Traffic:
    """An instance's traffic since it started, or several added up."""

    requests_by_class: Mapping[str, int] = field(default_factory=dict)
    errors_by_cause: Mapping[str, int] = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0
    active: int = 0
    first_byte: Buckets = ()
    duration: Buckets = ()

    @property
    def requests(self) -> int:
        """Every request answered."""
        return sum(self.requests_by_class.values())

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Traffic:
        """What an instance's ``/_proxy/stats`` says; ValueError if it does not parse."""
        try:
            return cls(
                requests_by_class=_counts(data["requests_by_class"]),
                errors_by_cause=_counts(data["errors_by_cause"]),
                bytes_in=int(data["bytes_in"]),
                bytes_out=int(data["bytes_out"]),
                active=int(data["active"]),
                first_byte=_buckets(data["first_byte"]),
                duration=_buckets(data["duration"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"unreadable stats: {exc}") from None


def _counts(data: Any) -> dict[str, int]:
    return {str(k)[:100]: int(v) for k, v in dict(data).items()}


def _buckets(data: Any) -> Buckets:
    return tuple((math.inf if b < 0 else float(b), float(c)) for b, c in data)


def merged(items: Iterable[Traffic]) -> Traffic:
    """``items`` added up (histograms with the same buckets add bucket by bucket)."""
    items = list(items)
    if not items:
        return Traffic()

    def add(name: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in items:
            for k, v in getattr(t, name).items():
                out[k] = out.get(k, 0) + v
        return out

    def hist(name: str) -> Buckets:
        shapes = {tuple(b for b, _ in getattr(t, name)) for t in items}
        if len(shapes) != 1:
            return ()
        columns = zip(*(getattr(t, name) for t in items), strict=True)
        return tuple((col[0][0], sum(c for _, c in col)) for col in columns)

    return Traffic(
        add("requests_by_class"),
        add("errors_by_cause"),
        sum(t.bytes_in for t in items),
        sum(t.bytes_out for t in items),
        sum(t.active for t in items),
        hist("first_byte"),
        hist("duration"),
    )


def percentile(buckets: Buckets, q: float) -> float:
    """The upper bound of the bucket holding the ``q`` quantile (0 when empty; the last
    finite bound when it is beyond every bound)."""
    if not buckets or buckets[-1][1] <= 0:
        return 0.0
    wanted = q * buckets[-1][1]
    finite = [b for b, _ in buckets if b != math.inf]
    for bound, count in buckets:
        if count >= wanted:
            return bound if bound != math.inf else (finite[-1] if finite else 0.0)
    return finite[-1] if finite else 0.0


@dataclass(frozen=True, slots=True)
class Asked:
    """One instance's answer, or why there is none."""

    instance: Instance
    answer: dict[str, Any] | None
    error: str = ""


@dataclass(frozen=True, slots=True)
class InstanceTraffic:
    """One instance's traffic, or why it is not known."""

    instance: Instance
    traffic: Traffic | None
    error: str = ""


@dataclass(frozen=True, slots=True)
class Diagnostics:
    """The bundle."""

    proxy: Proxy
    scaling_events: Sequence[ScalingEvent]
    revisions: Sequence[ConfigRevision]
    instances: Sequence[Asked]
    time: datetime


class ProxyInsight:
    """Traffic and diagnostics of a proxy, for its owner."""

    def __init__(
        self, uow: UnitOfWorkFactory, lister: Lister, admin: InstanceAdmin, clock: Clock
    ) -> None:
        self._uow = uow
        self._lister = lister
        self._admin = admin
        self._clock = clock

    async def traffic(self, owner_id: str, proxy_id: str) -> tuple[list[InstanceTraffic], Traffic]:
        """Each instance's traffic (asked now) and the total of those that answered."""
        async with self._uow(lag_tolerant=True) as uow:
            proxy = await load(uow, owner_id, proxy_id)
        read = [_read(a) for a in await self._ask(proxy, "/_proxy/stats")]
        return read, merged(r.traffic for r in read if r.traffic is not None)

    async def diagnostics(self, owner_id: str, proxy_id: str) -> Diagnostics:
        """The proxy with its recent scaling and config history, and what each instance
        says of itself now."""
        async with self._uow(lag_tolerant=True) as uow:
            proxy = await load(uow, owner_id, proxy_id)
            events = await uow.proxies.scaling_events(proxy.id, self._query(20))
            revisions = await uow.proxies.revisions(proxy.id, self._query(5))
        asked = await self._ask(proxy, "/_proxy/diagnostics")
        return Diagnostics(proxy, events[:20], revisions[:5], asked, self._clock.now())

    def _query(self, size: int) -> Any:
        return self._lister.query(
            NEWEST_FIRST, page_size=size, page_token="", filter="", order_by="", scope="insight"
        )

    async def _ask(self, proxy: Proxy, path: str) -> list[Asked]:
        async def one(instance: Instance) -> Asked:
            try:
                return Asked(instance, await self._admin.get(proxy, instance, path, ASK_WITHIN))
            except InstanceUnreachableError as exc:
                return Asked(instance, None, str(exc))

        return list(await asyncio.gather(*(one(i) for i in proxy.instances)))


def _read(asked: Asked) -> InstanceTraffic:
    """An instance's stats, parsed; an answer that does not parse counts as none."""
    if asked.answer is None:
        return InstanceTraffic(asked.instance, None, asked.error)
    try:
        return InstanceTraffic(asked.instance, Traffic.from_json(asked.answer))
    except ValueError as exc:
        return InstanceTraffic(asked.instance, None, str(exc))
