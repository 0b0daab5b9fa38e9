"""Circuit breakers on outbound dependencies, from purgatory.

**Why purgatory.** It is asyncio-native (a breaker is an ``async with``), its state model
is the classic closed -> opened -> half-opened with a failure threshold and a time to
stay open, its message bus tells a hook of every change (the metrics here), and it can
keep breakers' state in Redis, should replicas ever need to share it. pybreaker's async
support needs Tornado; aiobreaker has not been released since 2021.

One :class:`Breakers` per server process. A breaker is named ``<kind>.<target>`` (the
target may be empty): ``webhook.<webhook id>`` per webhook endpoint, ``proxy-admin.<proxy
id>`` per proxy's admin side. Each kind has its threshold and time open
(:class:`BreakerKind`). What a breaker does while open is its caller's choice: a webhook
delivery is put off until the breaker would let a trial through; a proxy admin call fails
at once as an unreachable instance.

Seen as ``tunnelplane_circuit_breakers{kind,state}`` (how many of a kind are in each
state), ``tunnelplane_circuit_breaker_transitions_total{kind,state}``, in
``GetSystemStatus`` (every breaker not closed), and reset by ``ResetCircuitBreaker``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from purgatory import (
    AsyncCircuitBreakerFactory,
    AsyncInMemoryUnitOfWork,
    SyncCircuitBreakerFactory,
    SyncInMemoryUnitOfWork,
)
from purgatory.domain.model import ClosedState, Context, OpenedState

from server.status import Breaker

log = logging.getLogger("tunnelplane.breakers")
STATES = ("closed", "opened", "half-opened")
#: A breaker ready for its trial this long, and never called since, is forgotten.
FORGET_AFTER = 3600.0


class BreakerOpenError(Exception):
    """The breaker is open: the call was not made. ``retry_in`` is how many seconds until
    the breaker lets a trial call through."""

    def __init__(self, name: str, retry_in: float) -> None:
        super().__init__(f"circuit breaker {name} is open")
        self.name = name
        self.retry_in = retry_in


class BreakerUnknownError(KeyError):
    """No breaker of that name exists in this process."""


@dataclass(frozen=True, slots=True)
class BreakerKind:
    """The rules of one kind of breaker."""

    #: Consecutive failures that open it.
    threshold: int
    #: Seconds it stays open before it lets a trial call through (half-opened).
    open_for: float


class Breakers:
    """Every circuit breaker of this process."""

    def __init__(self, kinds: dict[str, BreakerKind], registry: CollectorRegistry) -> None:
        self._kinds = dict(kinds)
        self._uow = AsyncInMemoryUnitOfWork()
        # A cancelled call says nothing of the dependency.
        self._factory = AsyncCircuitBreakerFactory(uow=self._uow, exclude=[asyncio.CancelledError])
        self._factory.add_listener(self._changed)
        # Calls made from threads (the span exporter's) use purgatory's sync breakers.
        self._sync_uow = SyncInMemoryUnitOfWork()
        self._sync = SyncCircuitBreakerFactory(uow=self._sync_uow)
        self._sync.add_listener(self._changed)
        #: Consecutive failures per breaker (purgatory's open state does not keep them).
        self._failures: dict[str, int] = {}
        self._transitions = PromCounter(
            "tunnelplane_circuit_breaker_transitions_total",
            "Circuit breakers entering a state, by kind.",
            ["kind", "state"],
            registry=registry,
        )
        registry.register(_StateCollector(self))

    @asynccontextmanager
    async def guard(self, kind: str, target: str = "") -> AsyncIterator[None]:
        """Run the block under the breaker ``kind.target``: an exception out of it counts
        as a failure; :class:`BreakerOpenError` instead of running it while open."""
        rules = self._kinds[kind]
        name = f"{kind}.{target}" if target else kind
        breaker = await self._factory.get_breaker(name, rules.threshold, rules.open_for)
        try:
            async with breaker:
                yield
        except OpenedState as opened:
            left = opened.opened_at + rules.open_for - time.time()
            raise BreakerOpenError(name, max(0.0, left)) from None

    @contextmanager
    def guard_sync(self, kind: str, target: str = "") -> Iterator[None]:
        """:meth:`guard` for code that runs in a thread of its own."""
        rules = self._kinds[kind]
        name = f"{kind}.{target}" if target else kind
        breaker = self._sync.get_breaker(name, rules.threshold, rules.open_for)
        try:
            with breaker:
                yield
        except OpenedState as opened:
            left = opened.opened_at + rules.open_for - time.time()
            raise BreakerOpenError(name, max(0.0, left)) from None

    def states(self) -> list[Breaker]:
        """Every breaker not closed, by name. One whose open time has passed shows as
        half-opened (its next call is the trial); one left so for an hour, whose target
        has not been called since (a deleted endpoint, say), is forgotten."""
        now, found = time.time(), []
        for name, c in sorted(self._contexts().items()):
            state = c.state
            if state == "opened" and c.opened_at is not None and now >= c.opened_at + c.ttl:
                if now >= c.opened_at + c.ttl + FORGET_AFTER:
                    self._forget(name)
                    continue
                state = "half-opened"
            if state != "closed":
                found.append(
                    Breaker(name, _kind(name), state, self._failures.get(name, 0), c.opened_at)
                )
        return found

    def counts(self) -> Counter[tuple[str, str]]:
        """How many breakers of each kind are in each state."""
        return Counter((_kind(name), c.state) for name, c in self._contexts().items())

    async def reset(self, name: str) -> Breaker:
        """Close the breaker ``name`` now (an operator's decision: the dependency is back)."""
        context = self._contexts().get(name)
        if context is None:
            raise BreakerUnknownError(name)
        if context.state != "closed":
            context.set_state(ClosedState())
        context.recover_failure()
        threaded = name in self._sync_uow.contexts.breakers  # type: ignore[attr-defined]
        while context.messages:
            message = context.messages.pop(0)
            if threaded:
                self._sync.messagebus.handle(message, self._sync_uow)
            else:
                await self._factory.messagebus.handle(message, self._uow)
        self._failures.pop(name, None)
        return Breaker(name, _kind(name), context.state, 0, None)

    def _forget(self, name: str) -> None:
        self._uow.contexts.breakers.pop(name, None)  # type: ignore[attr-defined]
        self._sync_uow.contexts.breakers.pop(name, None)  # type: ignore[attr-defined]
        self._failures.pop(name, None)

    def _contexts(self) -> dict[str, Context]:
        threaded: dict[str, Context] = dict(self._sync_uow.contexts.breakers)  # type: ignore[attr-defined]
        return {**threaded, **self._uow.contexts.breakers}  # type: ignore[attr-defined]

    def _changed(self, name: str, what: str, event: Any) -> None:
        if what == "failed":
            self._failures[name] = int(event.failure_count)
            return
        if what == "recovered":
            self._failures.pop(name, None)
            return
        if what != "state_changed":
            return
        state = str(event.state)
        self._transitions.labels(_kind(name), state).inc()
        log.log(
            logging.WARNING if state == "opened" else logging.INFO,
            "circuit breaker %s is %s",
            name,
            state,
            extra={"breaker": name, "state": state},
        )


def _kind(name: str) -> str:
    return name.partition(".")[0]


class _StateCollector(Collector):
    """``tunnelplane_circuit_breakers{kind,state}``, counted at scrape time."""

    def __init__(self, breakers: Breakers) -> None:
        self._breakers = breakers

    def collect(self) -> Any:
        family = GaugeMetricFamily(
            "tunnelplane_circuit_breakers",
            "Circuit breakers of each kind in each state (closed, opened, half-opened).",
            labels=["kind", "state"],
        )
        counts = self._breakers.counts()
        for kind in sorted({k for k, _ in counts} | set(self._breakers._kinds)):
            for state in STATES:
                family.add_metric([kind, state], counts.get((kind, state), 0))
        yield family
