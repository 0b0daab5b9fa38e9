"""Where rate-limit state lives: Redis (shared by every replica) or this process.

One decision is one Lua script run (``EVALSHA``): the address block, the address's
bucket, the subject's bucket (with its queue reservation), the monthly quota and its
retry de-duplication, checked and committed atomically. Each script run is written at
once on a dedicated connection and its reply matched in order (:mod:`server.storage.resp`).
The in-process limiter runs the same steps with the same arithmetic
(:func:`server.domain.ratelimit.gcra`); :class:`FallbackLimiter` switches to it while
Redis is unreachable and back when it returns.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from server.domain.ratelimit import (
    TOLERANCE_MS,
    BlockPolicy,
    Bucket,
    Check,
    Decision,
    Enforcement,
    GcraResult,
    IpBlock,
    Outcome,
    gcra,
)
from server.storage.resp import RespConnection, bulk

log = logging.getLogger(__name__)
#: Keys outlive their TAT by this much, so a slow clock never expires one early.
KEY_MARGIN_MS = 60_000
#: How long a caller's request id is remembered, so that a retry is not counted twice.
DEDUPE_MS = 15 * 60_000
REDIS_TIMEOUT = 0.25

LUA = """
local function num(x) return tonumber(x) end
local TOLERANCE = __TOLERANCE__
local function to_micros(x) return math.floor(x * 1000) / 1000 end
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = num(t[1]) * 1000 + math.floor(num(t[2]) / 1000)
else
  now = num(ARGV[1])
end

local function gcra(key, interval, burst, cost, max_wait)
  local stored = redis.call('GET', key)
  local tat = now
  if stored then tat = math.max(num(stored), now) end
  local new_tat = tat + interval * cost
  local allow_at = new_tat - interval * burst
  local diff = now - allow_at
  if diff >= -TOLERANCE or -diff <= max_wait then
    local wait = 0
    local remaining = 0
    if diff >= -TOLERANCE then
      remaining = math.floor((math.max(diff, 0) + TOLERANCE) / interval)
    else
      wait = math.ceil(-diff)
    end
    return 1, to_micros(new_tat), wait, 0, remaining, math.ceil(new_tat - now)
  end
  return 0, tat, 0, math.ceil(-diff), 0, math.ceil(tat - now)
end

local dry = ARGV[11] == '1'
local enforce = ARGV[11] == '0'
local block_ttl = redis.call('PTTL', KEYS[1])
if block_ttl > 0 then
  return {1, 0, block_ttl, 0, block_ttl, -1, 0}
end

-- A refusal of an enforced call counts towards blocking its address.
local function violation()
  if not enforce then return 0 end
  local count = redis.call('INCR', KEYS[3])
  if count == 1 then redis.call('PEXPIRE', KEYS[3], ARGV[13]) end
  if count < num(ARGV[12]) then return 0 end
  local until_ms = now + num(ARGV[14])
  redis.call('SET', KEYS[1], string.format('%.0f:%.0f', now, until_ms), 'PX', ARGV[14])
  redis.call('DEL', KEYS[3])
  return 1
end

local ip_ok, ip_tat, _, ip_retry, _, ip_reset = gcra(KEYS[2], num(ARGV[2]), num(ARGV[3]), 1, 0)
if ip_ok == 0 then
  return {2, 0, ip_retry, 0, ip_reset, -1, violation()}
end

local ok, tat, wait, retry, remaining, reset = gcra(
  KEYS[4], num(ARGV[4]), num(ARGV[5]), num(ARGV[6]), num(ARGV[7]))
if ok == 0 then
  return {3, 0, retry, 0, reset, -1, violation()}
end

local quota_limit = num(ARGV[8])
local used = -1
local count_it = false
if quota_limit >= 0 then
  used = num(redis.call('GET', KEYS[5]) or '0')
  count_it = ARGV[10] == '' or redis.call('EXISTS', KEYS[6]) == 0
  if count_it and used + 1 > quota_limit then
    return {4, 0, math.ceil(num(ARGV[9])), 0, math.ceil(num(ARGV[9])), used, 0}
  end
end

if not dry then
  redis.call('SET', KEYS[2], string.format('%.3f', ip_tat), 'PX',
    math.ceil(ip_tat - now) + __MARGIN__)
  redis.call('SET', KEYS[4], string.format('%.3f', tat), 'PX', math.ceil(tat - now) + __MARGIN__)
  if count_it then
    used = redis.call('INCR', KEYS[5])
    if used == 1 then redis.call('PEXPIRE', KEYS[5], math.ceil(num(ARGV[9])) + 86400000) end
    if ARGV[10] ~= '' then redis.call('SET', KEYS[6], '1', 'PX', __DEDUPE__) end
  end
end
return {0, wait, 0, remaining, reset, used, 0}
"""
for _name, _value in (
    ("__MARGIN__", KEY_MARGIN_MS),
    ("__DEDUPE__", DEDUPE_MS),
    ("__TOLERANCE__", TOLERANCE_MS),
):
    LUA = LUA.replace(_name, repr(_value))


def keys_of(check: Check, prefix: str = "") -> list[str]:
    """The six keys a decision touches, in the script's order."""
    return [
        f"{prefix}ipblock:{check.ip}",
        f"{prefix}rl:ip:{check.ip}",
        f"{prefix}ipviol:{check.ip}",
        f"{prefix}rl:{check.subject}",
        f"{prefix}{check.quota_key or 'quota:none'}",
        f"{prefix}dedupe:{check.dedupe or 'none'}",
    ]


def args_of(check: Check) -> list[Any]:
    """The script's arguments for ``check``."""
    return [
        "" if check.now_ms is None else repr(float(check.now_ms)),
        repr(check.ip_bucket.interval_ms),
        check.ip_bucket.burst,
        repr(check.subject_bucket.interval_ms),
        check.subject_bucket.burst,
        check.cost,
        repr(float(check.max_wait_ms)),
        check.quota_limit if check.quota_key else -1,
        math.ceil(check.quota_reset_ms),
        check.dedupe,
        str(int(check.enforcement)),
        check.block.after,
        int(check.block.window_ms),
        int(check.block.duration_ms),
    ]


_EMPTY = b"$0\r\n\r\n"
#: Encoded arguments that repeat from call to call (keys of active callers, limits).
_repeated = functools.lru_cache(maxsize=16_384)(bulk)


@functools.lru_cache(maxsize=1024)
def _bucket_args(bucket: Bucket) -> bytes:
    return bulk(repr(bucket.interval_ms)) + bulk(str(bucket.burst))


@functools.lru_cache(maxsize=64)
def _block_args(block: BlockPolicy) -> bytes:
    return b"".join(
        bulk(str(v)) for v in (block.after, int(block.window_ms), int(block.duration_ms))
    )


def evalsha_of(check: Check, prefix: str, sha: bytes) -> bytes:
    """``EVALSHA sha 6 keys... args...`` in RESP, as :func:`keys_of` and :func:`args_of`
    say, built mostly from cached pieces (a third of the cost of encoding it afresh)."""
    ip = check.ip
    return b"".join(
        (
            b"*23\r\n$7\r\nEVALSHA\r\n",
            bulk(sha.decode()),
            b"$1\r\n6\r\n",
            _repeated(f"{prefix}ipblock:{ip}"),
            _repeated(f"{prefix}rl:ip:{ip}"),
            _repeated(f"{prefix}ipviol:{ip}"),
            _repeated(f"{prefix}rl:{check.subject}"),
            _repeated(f"{prefix}{check.quota_key or 'quota:none'}"),
            bulk(f"{prefix}dedupe:{check.dedupe}")
            if check.dedupe
            else _repeated(f"{prefix}dedupe:none"),
            _EMPTY if check.now_ms is None else bulk(repr(float(check.now_ms))),
            _bucket_args(check.ip_bucket),
            _bucket_args(check.subject_bucket),
            _repeated(str(check.cost)),
            _repeated(repr(float(check.max_wait_ms))),
            _repeated(str(check.quota_limit if check.quota_key else -1)),
            bulk(str(math.ceil(check.quota_reset_ms))),
            bulk(check.dedupe) if check.dedupe else _EMPTY,
            _repeated(str(int(check.enforcement))),
            _block_args(check.block),
        )
    )


def decision_of(reply: list[Any]) -> Decision:
    """Parse the script's reply."""
    outcome, wait, retry, remaining, reset, used, blocked = (int(v) for v in reply)
    return Decision(Outcome(outcome), wait, retry, remaining, reset, used, bool(blocked))


class RedisLimiter:
    """Decisions in Redis: each one ``EVALSHA`` written at once on a dedicated connection
    (:mod:`server.storage.resp`); the admin reads go through redis-py."""

    backend = "redis"

    def __init__(self, client: aioredis.Redis, prefix: str, connection: RespConnection) -> None:
        self._redis = client
        self._prefix = prefix
        self._connection = connection
        self._sha = b""

    async def decide(self, check: Check) -> Decision:
        """One script run (the connection fails it after :data:`REDIS_TIMEOUT`)."""
        connection = self._connection
        if not self._sha:
            self._sha = await connection.execute("SCRIPT", "LOAD", LUA)  # type: ignore[assignment]
        try:
            reply = await connection.execute_encoded(evalsha_of(check, self._prefix, self._sha))
        except NoScriptError:
            self._sha = await connection.execute("SCRIPT", "LOAD", LUA)  # type: ignore[assignment]
            reply = await connection.execute_encoded(evalsha_of(check, self._prefix, self._sha))
        except RedisConnectionError:
            # A connection from before a Redis restart: once more, on a fresh one.
            reply = await connection.execute_encoded(evalsha_of(check, self._prefix, self._sha))
        return decision_of(reply)  # type: ignore[arg-type]

    async def close(self) -> None:
        """Close the dedicated connection."""
        await self._connection.close()

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
        """A quota counter's value."""
        value = await self._redis.get(f"{self._prefix}{key}")
        return int(value or 0)

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
        block = self._get(keys[0], now)
        if block is not None:
            left = int(block[1] - now)
            return Decision(Outcome.IP_BLOCKED, 0, left, 0, left)
        ip = gcra(self._get(keys[1], now), now, check.ip_bucket, 1, 0)
        if not ip.allowed:
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
        if check.enforcement != Enforcement.DRY_RUN:
            used = self._commit(check, keys, now, ip, subject, used, count_it)
        return Decision(
            Outcome.ALLOWED, subject.wait_ms, 0, subject.remaining, subject.reset_ms, used
        )

    def _violation(self, check: Check, keys: list[str], now: float) -> bool:
        """Count a refusal towards blocking the address; whether it is blocked now."""
        if check.enforcement != Enforcement.ENFORCE:
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
        ip: GcraResult,
        subject: GcraResult,
        used: int,
        count_it: bool,
    ) -> int:
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
            except (RedisError, OSError, TimeoutError) as exc:
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
            except (RedisError, OSError, TimeoutError) as exc:
                self.set_available(False, error=repr(exc))
        return await self._local.counter(key)

    async def close(self) -> None:
        """Close Redis connections."""
        if self._primary is not None:
            await self._primary.close()

    async def lift(self, ip: str) -> bool:
        """Lift a block everywhere it may be."""
        lifted = await self._local.lift(ip)
        if self._primary is not None and self._up:
            lifted = await self._primary.lift(ip) or lifted
        return lifted
