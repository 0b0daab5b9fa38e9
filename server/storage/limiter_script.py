"""The Redis limiter's script and its command encoding.

One decision is one ``EVALSHA`` of :data:`LUA`: the address block, the address's bucket
(anonymous callers only), the subject's bucket (with its queue reservation), the monthly
quota and its retry de-duplication, checked and committed atomically. The arithmetic is
:func:`server.domain.limits.rules.gcra`'s, step for step; a property test holds the two to
the same answers.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from server.domain.limits.model import BlockPolicy, Bucket, Check, Decision, Outcome
from server.domain.limits.rules import TOLERANCE_MS
from server.storage.resp import bulk

#: Keys outlive their TAT by this much, so a slow clock never expires one early.
KEY_MARGIN_MS = 60_000
#: How long a counted call's retry key is remembered, so that a retry is not counted twice.
DEDUPE_MS = 15 * 60_000

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
-- The address's block and limit hold anonymous callers only; the authenticated are held
-- to their own subject's limit.
local by_address = ARGV[15] == '1'
if by_address then
  local block_ttl = redis.call('PTTL', KEYS[1])
  if block_ttl > 0 then
    return {1, 0, block_ttl, 0, block_ttl, -1, 0, 0}
  end
end

-- A refusal of an enforced anonymous call counts towards blocking its address.
local function violation()
  if not enforce or not by_address then return 0 end
  local count = redis.call('INCR', KEYS[3])
  if count == 1 then redis.call('PEXPIRE', KEYS[3], ARGV[13]) end
  if count < num(ARGV[12]) then return 0 end
  local until_ms = now + num(ARGV[14])
  redis.call('SET', KEYS[1], string.format('%.0f:%.0f', now, until_ms), 'PX', ARGV[14])
  redis.call('DEL', KEYS[3])
  return 1
end

local ip_tat = 0
if by_address then
  local ip_ok, ip_at, _, ip_retry, _, ip_reset = gcra(KEYS[2], num(ARGV[2]), num(ARGV[3]), 1, 0)
  if ip_ok == 0 then
    return {2, 0, ip_retry, 0, ip_reset, -1, violation(), 0}
  end
  ip_tat = ip_at
end

local ok, tat, wait, retry, remaining, reset = gcra(
  KEYS[4], num(ARGV[4]), num(ARGV[5]), num(ARGV[6]), num(ARGV[7]))
if ok == 0 then
  return {3, 0, retry, 0, reset, -1, violation(), 0}
end

local quota_limit = num(ARGV[8])
local used = -1
local count_it = false
if quota_limit >= 0 then
  used = num(redis.call('GET', KEYS[5]) or '0')
  count_it = ARGV[10] == '' or redis.call('EXISTS', KEYS[6]) == 0
  if count_it and used + 1 > quota_limit then
    return {4, 0, math.ceil(num(ARGV[9])), 0, math.ceil(num(ARGV[9])), used, 0, 0}
  end
end

local created = 0
if not dry then
  if by_address then
    redis.call('SET', KEYS[2], string.format('%.3f', ip_tat), 'PX',
      math.ceil(ip_tat - now) + __MARGIN__)
  end
  redis.call('SET', KEYS[4], string.format('%.3f', tat), 'PX', math.ceil(tat - now) + __MARGIN__)
  if count_it then
    used = redis.call('INCR', KEYS[5])
    if used == 1 then
      redis.call('PEXPIRE', KEYS[5], math.ceil(num(ARGV[9])) + 86400000)
      created = 1
    end
    if ARGV[10] ~= '' then redis.call('SET', KEYS[6], '1', 'PX', __DEDUPE__) end
  end
end
return {0, wait, 0, remaining, reset, used, 0, created}
"""
#: Adds the persisted figure to a counter a call made again (never makes one: a counter
#: that vanished meanwhile is made, with its expiry, by the next call).
SEED_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('INCRBY', KEYS[1], ARGV[1]) end
return -1
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
        "1" if check.by_address else "0",
    ]


_EMPTY = b"$0\r\n\r\n"
_BY_ADDRESS, _BY_SUBJECT = bulk("1"), bulk("0")
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
            b"*24\r\n$7\r\nEVALSHA\r\n",
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
            _BY_ADDRESS if check.by_address else _BY_SUBJECT,
        )
    )


def decision_of(reply: list[Any]) -> Decision:
    """Parse the script's reply."""
    outcome, wait, retry, remaining, reset, used, blocked, created = (int(v) for v in reply)
    return Decision(
        Outcome(outcome), wait, retry, remaining, reset, used, bool(blocked), bool(created)
    )
