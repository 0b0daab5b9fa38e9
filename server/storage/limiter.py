"""Where rate-limit state lives: Redis (shared by every replica) or this process.

A decision in Redis is one Lua script run (``EVALSHA`` through redis-py,
:mod:`server.storage.limiter_script`): the address block and the address's bucket
(anonymous callers only), the subject's bucket (with its queue reservation), the monthly
quota and its retry de-duplication, checked and committed atomically. A signed-in
caller's busy subject is mostly decided here instead, from a slice of its budget that the
script leased to this replica (:mod:`server.storage.limiter_lease`, which states the
over-admission bound). The in-process limiter runs the same steps with the same arithmetic
(:func:`server.domain.limits.rules.gcra`); :class:`FallbackLimiter` switches to it while
Redis is unreachable and back when it returns.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from server.domain.limits.model import Check, Decision, Enforcement, GcraResult, IpBlock, Outcome
from server.domain.limits.rules import gcra
from server.storage.limiter_lease import Leases, leasable, slice_cap
from server.storage.limiter_script import (
    COUNTER_MARGIN_MS,
    DEDUPE_MS,
    FLUSH_LUA,
    KEY_MARGIN_MS,
    LUA,
    SEED_LUA,
    args_of,
    decision_of,
    keys_of,
)

log = logging.getLogger("tunnelplane.limiter")
#: A script run that takes longer fails, and the call is decided in process.
REDIS_TIMEOUT = 0.25
_REDIS_DOWN = (RedisError, OSError, TimeoutError)


def _now(check: Check) -> float:
    return time.time() * 1000 if check.now_ms is None else float(check.now_ms)


class RedisLimiter:
    """Decisions in Redis, or from slices of budgets leased from Redis.

    ``lease_max`` is the most calls one slice covers (1: no slices, every call is decided
    in Redis); ``lease_ttl`` how long a slice may be spent, in seconds, and how long counts
    made here may wait before they are added to Redis's counters. ``on_run`` is told of
    every script run that decides a call.
    """

    backend = "redis"

    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str,
        *,
        lease_max: int = 1,
        lease_ttl: float = 1.0,
        on_run: Callable[[], None] = lambda: None,
    ) -> None:
        self._on_run = on_run
        self._redis = client
        self._prefix = prefix
        self._script = client.register_script(LUA)
        self._seed = client.register_script(SEED_LUA)
        self._flush = client.register_script(FLUSH_LUA)
        self._ttl = lease_ttl
        self._leases = Leases(lease_ttl * 1000, lease_max, self._arm)
        self._inflight: dict[str, asyncio.Task[Decision]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    async def decide(self, check: Check) -> Decision:
        """Decide from this replica's slice of the subject's budget if it has one; else in
        Redis, one script run (failed after :data:`REDIS_TIMEOUT`), which may lease a new
        slice. Calls of one subject that find no slice while one is being asked for wait
        for that answer (one request per subject at a time)."""
        leases = self._leases
        if (
            not leasable(check)
            or slice_cap(check.subject_bucket, leases.ttl_ms, leases.maximum) < 2
        ):
            exact, _, _ = await self._run(check, 0, 0)
            return exact
        now = _now(check)
        if leases.running_low(check, now) and self._idle(check.subject):
            return await self._renew(check, now)
        while (decision := leases.spend(check, now)) is None:
            inflight = self._inflight.get(check.subject)
            if inflight is None or inflight.done():
                # Done: its answer left no slice for this call (awaiting a done task would
                # not yield, and this loop would spin).
                return await self._renew(check, now)
            await asyncio.shield(inflight)
            now = _now(check)
        return decision

    def _idle(self, subject: str) -> bool:
        """No request for a slice of ``subject`` is under way."""
        inflight = self._inflight.get(subject)
        return inflight is None or inflight.done()

    async def _renew(self, check: Check, now: float) -> Decision:
        """Decide ``check`` in Redis and take a new slice with it."""
        size, want, quota_want = self._leases.wants(check, now)
        task = asyncio.ensure_future(self._lease(check, now, size, want, quota_want))
        self._inflight[check.subject] = task
        task.add_done_callback(lambda done: self._settled(check.subject, done))
        return await asyncio.shield(task)

    async def _lease(
        self, check: Check, now: float, size: int, want: int, quota_want: int
    ) -> Decision:
        decision, extra, allowance = await self._run(check, want, quota_want)
        self._leases.granted(check, now, size, decision, extra, allowance)
        return decision

    def _settled(self, subject: str, task: asyncio.Task[Decision]) -> None:
        if self._inflight.get(subject) is task:
            del self._inflight[subject]
        if not task.cancelled():
            task.exception()  # retrieved: the callers that awaited it have it

    async def _run(self, check: Check, want: int, quota_want: int) -> tuple[Decision, int, int]:
        """One script run for ``check``, carrying this replica's pending counts of its
        monthly counter."""
        sent = self._leases.take(check.quota_key) if check.quota_key else 0
        args = args_of(check, want, quota_want, sent)
        self._on_run()
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                reply = await self._script(keys=keys_of(check, self._prefix), args=args)
        except BaseException:
            self._leases.returned(check.quota_key, sent)
            raise
        decision, extra, allowance = decision_of(reply)
        return self._leases.flushed(check, _now(check), sent, decision), extra, allowance

    def _arm(self, key: str) -> None:
        """Flush ``key``'s pending counts one lease interval from now."""
        loop = asyncio.get_running_loop()
        self._timers[key] = loop.call_later(self._ttl, self._due, key)

    def _due(self, key: str) -> None:
        self._timers.pop(key, None)
        task = asyncio.ensure_future(self._flush_counts(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush_counts(self, key: str) -> tuple[int, bool] | None:
        """Add the counts of ``key`` made here to Redis (a failure keeps them for the next
        try, one interval later); the counter's value and whether the flush made it
        again, if counts were sent."""
        flushed = None
        sent = self._leases.take(key)
        if sent:
            now = time.time() * 1000
            expiry = max(0, math.ceil(self._leases.month_end(key) - now)) + COUNTER_MARGIN_MS
            try:
                async with asyncio.timeout(REDIS_TIMEOUT):
                    value, created = await self._flush(
                        keys=[f"{self._prefix}{key}"], args=[sent, expiry]
                    )
            except _REDIS_DOWN as exc:
                self._leases.returned(key, sent)
                log.debug("monthly counts not flushed; will retry", extra={"error": repr(exc)})
            except BaseException:
                self._leases.returned(key, sent)
                raise
            else:
                flushed = int(value), bool(created)
                self._leases.counted_in_redis(key, sent, *flushed)
        if key not in self._timers and self._leases.reschedule(key):
            self._arm(key)
        return flushed

    async def flush_counts(self) -> dict[str, tuple[int, bool]]:
        """Add every count made here to Redis now (see :meth:`Limiter.flush_counts`)."""
        flushed = {}
        for key in self._leases.pending_keys():
            result = await self._flush_counts(key)
            if result is not None:
                flushed[key] = result
        return flushed

    async def close(self) -> None:
        """Add the counts made here to Redis, once, and stop the timers (the client is
        the server's, closed by it)."""
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        if self._inflight:
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.flush_counts()
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()

    async def blocks(self) -> list[IpBlock]:
        """Every address blocked now (one SCAN)."""
        found = []
        pattern = f"{self._prefix}ipblock:*"
        async for key in self._redis.scan_iter(match=pattern, count=500):
            value = await self._redis.get(key)
            if value is None:
                continue
            text = value.decode() if isinstance(value, bytes) else str(value)
            name = key.decode() if isinstance(key, bytes) else str(key)
            since, _, until = text.partition(":")
            ip = name[len(self._prefix) + len("ipblock:") :]
            found.append(IpBlock(ip, "ip", float(since), float(until)))
        return found

    async def counter(self, key: str) -> int:
        """A quota counter's value: Redis's, and the counts made here not yet in it."""
        value = await self._redis.get(f"{self._prefix}{key}")
        return int(value or 0) + self._leases.pending(key)

    async def seed(self, key: str, amount: int) -> bool:
        """Add ``amount`` to a quota counter, if it exists (and count here no more against
        it without asking)."""
        self._leases.revoke(key)
        added = await self._seed(keys=[f"{self._prefix}{key}"], args=[amount])
        return int(added) >= 0

    async def lift(self, ip: str) -> bool:
        """Delete a block and the address's refusal count."""
        removed = await self._redis.delete(
            f"{self._prefix}ipblock:{ip}", f"{self._prefix}ipviol:{ip}"
        )
        return bool(removed)


class MemoryLimiter:
    """The same decisions in this process (embedded mode, or while Redis is down)."""

    backend = "memory"

    def __init__(self, max_keys: int = 200_000) -> None:
        self._data: OrderedDict[str, tuple[Any, float]] = OrderedDict()
        self._max = max_keys

    def _get(self, key: str, now: float) -> Any:
        item = self._data.get(key)
        if item is None or item[1] <= now:
            self._data.pop(key, None)
            return None
        return item[0]

    def _set(self, key: str, value: Any, ttl_ms: float, now: float) -> None:
        self._data[key] = (value, now + ttl_ms)
        self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)

    async def decide(self, check: Check) -> Decision:
        """Answer ``check`` (no await inside: atomic on the event loop)."""
        now = time.time() * 1000 if check.now_ms is None else float(check.now_ms)
        keys = keys_of(check)
        block = self._get(keys[0], now) if check.by_address else None
        if block is not None:
            left = int(block[1] - now)
            return Decision(Outcome.IP_BLOCKED, 0, left, 0, left)
        ip = gcra(self._get(keys[1], now), now, check.ip_bucket, 1, 0) if check.by_address else None
        if ip is not None and not ip.allowed:
            return Decision(
                Outcome.IP_LIMITED, 0, ip.retry_after_ms, 0, ip.reset_ms, -1,
                self._violation(check, keys, now),
            )  # fmt: skip
        subject = gcra(
            self._get(keys[3], now), now, check.subject_bucket, check.cost, check.max_wait_ms
        )
        if not subject.allowed:
            return Decision(
                Outcome.SUBJECT_LIMITED, 0, subject.retry_after_ms, 0, subject.reset_ms, -1,
                self._violation(check, keys, now),
            )  # fmt: skip
        used, count_it = -1, False
        if check.quota_key and check.quota_limit >= 0:
            used = int(self._get(keys[4], now) or 0)
            count_it = not check.dedupe or self._get(keys[5], now) is None
            if count_it and used + 1 > check.quota_limit:
                reset = int(-(-check.quota_reset_ms // 1))
                return Decision(Outcome.QUOTA_EXCEEDED, 0, reset, 0, reset, used)
        counted = count_it and check.enforcement != Enforcement.DRY_RUN
        if check.enforcement != Enforcement.DRY_RUN:
            used = self._commit(check, keys, now, ip, subject, used, count_it)
        return Decision(
            Outcome.ALLOWED, subject.wait_ms, 0, subject.remaining, subject.reset_ms, used,
            quota_created=counted and used == 1,
        )  # fmt: skip

    def _violation(self, check: Check, keys: list[str], now: float) -> bool:
        """Count a refusal towards blocking the address; whether it is blocked now."""
        if check.enforcement != Enforcement.ENFORCE or not check.by_address:
            return False
        count = (self._get(keys[2], now) or 0) + 1
        expires = self._data[keys[2]][1] if count > 1 else now + check.block.window_ms
        self._data[keys[2]] = (count, expires)
        if count < check.block.after:
            return False
        until = now + check.block.duration_ms
        self._set(keys[0], (now, until), check.block.duration_ms, now)
        self._data.pop(keys[2], None)
        return True

    def _commit(
        self,
        check: Check,
        keys: list[str],
        now: float,
        ip: GcraResult | None,
        subject: GcraResult,
        used: int,
        count_it: bool,
    ) -> int:
        if ip is not None:
            self._set(keys[1], ip.tat, -(-(ip.tat - now) // 1) + KEY_MARGIN_MS, now)
        self._set(keys[3], subject.tat, -(-(subject.tat - now) // 1) + KEY_MARGIN_MS, now)
        if not count_it:
            return used
        self._set(keys[4], used + 1, check.quota_reset_ms + 86_400_000, now)
        if check.dedupe:
            self._set(keys[5], 1, DEDUPE_MS, now)
        return used + 1

    async def blocks(self) -> list[IpBlock]:
        """Every address blocked now."""
        now = time.time() * 1000
        return [
            IpBlock(key[len("ipblock:") :], "ip", value[0], value[1])
            for key, (value, expires) in list(self._data.items())
            if key.startswith("ipblock:") and expires > now
        ]

    async def counter(self, key: str) -> int:
        """A quota counter's value."""
        return int(self._get(key, time.time() * 1000) or 0)

    async def seed(self, key: str, amount: int) -> bool:
        """Add ``amount`` to a quota counter, if it exists (a counter past its expiry is
        dropped by the next decision, as if it had never been seeded)."""
        item = self._data.get(key)
        if item is None:
            return False
        self._data[key] = (item[0] + amount, item[1])
        return True

    async def flush_counts(self) -> dict[str, tuple[int, bool]]:
        """Every count is in this process already."""
        return {}

    async def lift(self, ip: str) -> bool:
        """Delete a block."""
        self._data.pop(f"ipviol:{ip}", None)
        return self._data.pop(f"ipblock:{ip}", None) is not None


class FallbackLimiter:
    """Redis while it answers; this process's limiter while it does not."""

    def __init__(
        self,
        primary: RedisLimiter | None,
        local: MemoryLimiter,
        on_switch: Callable[[str], None] = lambda _backend: None,
        on_error: Callable[[], None] = lambda: None,
    ) -> None:
        self._on_error = on_error
        self._failed_at = -math.inf
        self._primary = primary
        self._local = local
        self._up = primary is not None
        self._on_switch = on_switch

    @property
    def backend(self) -> str:
        """The backend deciding now."""
        return "redis" if self._up else "memory"

    def set_available(self, up: bool, probed_at: float = math.inf, error: str = "") -> None:
        """Told by the health monitor whether Redis answers its probes (an "up" from a
        probe that started before the last failure here is stale, and ignored)."""
        if not up:
            self._failed_at = time.monotonic()
        if self._primary is None or up == self._up or (up and probed_at < self._failed_at):
            return
        self._up = up
        log.warning(
            "rate limiter now uses %s",
            self.backend,
            extra={"backend": self.backend, "error": error},
        )
        self._on_switch(self.backend)

    async def decide(self, check: Check) -> Decision:
        """Decide in Redis; on a Redis failure, switch and decide locally."""
        if self._primary is not None and self._up:
            try:
                return await self._primary.decide(check)
            except ResponseError as exc:
                # Redis answered: not an outage but a bug or a refusal (e.g. out of memory).
                # Loud, decided locally, and Redis stays in use for the next call.
                log.exception("rate limiter script failed", extra={"error": str(exc)})
                self._on_error()
            except _REDIS_DOWN as exc:
                self.set_available(False, error=repr(exc))
        return await self._local.decide(check)

    async def blocks(self) -> list[IpBlock]:
        """Blocks from the backend in use."""
        if self._primary is not None and self._up:
            return await self._primary.blocks()
        return await self._local.blocks()

    async def counter(self, key: str) -> int:
        """A quota counter from the backend in use."""
        if self._primary is not None and self._up:
            try:
                return await self._primary.counter(key)
            except _REDIS_DOWN as exc:
                self.set_available(False, error=repr(exc))
        return await self._local.counter(key)

    async def seed(self, key: str, amount: int) -> bool:
        """Add to a quota counter in the backend in use."""
        if self._primary is not None and self._up:
            try:
                return await self._primary.seed(key, amount)
            except _REDIS_DOWN as exc:
                self.set_available(False, error=repr(exc))
        return await self._local.seed(key, amount)

    async def close(self) -> None:
        """Close Redis connections."""
        if self._primary is not None:
            await self._primary.close()

    async def flush_counts(self) -> dict[str, tuple[int, bool]]:
        """Counts made here under Redis's leases, added to Redis now (none while Redis is
        down: they wait for it)."""
        if self._primary is not None and self._up:
            try:
                return await self._primary.flush_counts()
            except _REDIS_DOWN as exc:
                self.set_available(False, error=repr(exc))
        return {}

    async def lift(self, ip: str) -> bool:
        """Lift a block everywhere it may be."""
        lifted = await self._local.lift(ip)
        if self._primary is not None and self._up:
            lifted = await self._primary.lift(ip) or lifted
        return lifted
