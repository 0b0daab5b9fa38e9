"""The Redis limiter's scripts and their arguments.

One decision in Redis is one ``EVALSHA`` of :data:`LUA`: the address block and the
address's bucket (anonymous callers only), the subject's bucket (with its queue
reservation), the monthly quota and its retry de-duplication, checked and committed
atomically. The arithmetic is :func:`server.domain.limits.rules.gcra`'s, step for step; a
property test holds the two to the same answers.

The same run also serves the replica's leases (:mod:`server.storage.limiter_lease`): it
first adds the calls the replica counted on its own since its last run to the monthly
counter (``flush``), and, when the call is admitted at once, it advances the subject's
TAT by up to ``want`` more emission intervals (never past what the bucket holds now) and
grants up to ``quota_want`` more monthly counts (never past the quota), which the replica
then spends without asking.
"""

from __future__ import annotations

import math
from typing import Any

from server.domain.limits.model import Check, Decision, Outcome
from server.domain.limits.rules import TOLERANCE_MS

#: Keys outlive their TAT by this much, so a slow clock never expires one early.
KEY_MARGIN_MS = 60_000
#: How long a counted call's retry key is remembered, so that a retry is not counted twice.
DEDUPE_MS = 15 * 60_000
#: A monthly counter outlives its month by a day.
COUNTER_MARGIN_MS = 86_400_000

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

-- Calls the replica counted on its own go into the monthly counter first, whatever this
-- call's outcome; a counter that they make again is reported as made.
local created = 0
local flushed = -1
local flush = num(ARGV[18])
if flush > 0 then
  flushed = redis.call('INCRBY', KEYS[5], flush)
  if flushed == flush then
    redis.call('PEXPIRE', KEYS[5], math.ceil(num(ARGV[9])) + __COUNTER_MARGIN__)
    created = 1
  end
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
      remaining = math.min(math.floor((math.max(diff, 0) + TOLERANCE) / interval), burst - cost)
      if remaining < 0 then remaining = 0 end
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
    return {1, 0, block_ttl, 0, block_ttl, flushed, 0, created, 0, 0}
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
    return {2, 0, ip_retry, 0, ip_reset, flushed, violation(), created, 0, 0}
  end
  ip_tat = ip_at
end

local interval = num(ARGV[4])
local ok, tat, wait, retry, remaining, reset = gcra(
  KEYS[4], interval, num(ARGV[5]), num(ARGV[6]), num(ARGV[7]))
if ok == 0 then
  return {3, 0, retry, 0, reset, flushed, violation(), created, 0, 0}
end

local quota_limit = num(ARGV[8])
local used = -1
local count_it = false
if quota_limit >= 0 then
  used = num(redis.call('GET', KEYS[5]) or '0')
  count_it = ARGV[10] == '' or redis.call('EXISTS', KEYS[6]) == 0
  if count_it and used + 1 > quota_limit then
    return {4, 0, math.ceil(num(ARGV[9])), 0, math.ceil(num(ARGV[9])), used, 0, created, 0, 0}
  end
end

local extra = 0
local allowance = 0
if not dry then
  -- A slice for the replica: only from a bucket that admits this call at once.
  if wait == 0 then
    extra = math.min(num(ARGV[16]), remaining)
    if extra > 0 then
      tat = to_micros(tat + interval * extra)
      remaining = remaining - extra
      reset = math.ceil(tat - now)
    end
  end
  if by_address then
    redis.call('SET', KEYS[2], string.format('%.3f', ip_tat), 'PX',
      math.ceil(ip_tat - now) + __MARGIN__)
  end
  redis.call('SET', KEYS[4], string.format('%.3f', tat), 'PX', math.ceil(tat - now) + __MARGIN__)
  if count_it then
    used = redis.call('INCR', KEYS[5])
    if used == 1 then
      redis.call('PEXPIRE', KEYS[5], math.ceil(num(ARGV[9])) + __COUNTER_MARGIN__)
      created = 1
    end
    if ARGV[10] ~= '' then redis.call('SET', KEYS[6], '1', 'PX', __DEDUPE__) end
    -- Monthly counts the replica may make on its own: none while a counter made again
    -- waits for its persisted figure.
    if created == 0 then allowance = math.max(0, math.min(num(ARGV[17]), quota_limit - used)) end
  end
end
return {0, wait, 0, remaining, reset, used, 0, created, extra, allowance}
"""
#: Adds the persisted figure to a counter a call made again (never makes one: a counter
#: that vanished meanwhile is made, with its expiry, by the next call).
SEED_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('INCRBY', KEYS[1], ARGV[1]) end
return -1
"""
#: Adds the calls a replica counted on its own to a monthly counter: its value, and
#: whether this made it (a counter Redis lost).
FLUSH_LUA = """
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if value == tonumber(ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {value, 1}
end
return {value, 0}
"""
for _name, _value in (
    ("__MARGIN__", KEY_MARGIN_MS),
    ("__DEDUPE__", DEDUPE_MS),
    ("__TOLERANCE__", TOLERANCE_MS),
    ("__COUNTER_MARGIN__", COUNTER_MARGIN_MS),
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


def args_of(check: Check, want: int = 0, quota_want: int = 0, flush: int = 0) -> list[Any]:
    """The script's arguments for ``check``; with a lease's ``want`` of tokens and
    ``quota_want`` of monthly counts, and ``flush`` counts to add first."""
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
        int(check.enforcement),
        check.block.after,
        int(check.block.window_ms),
        int(check.block.duration_ms),
        1 if check.by_address else 0,
        want,
        quota_want,
        flush,
    ]


def decision_of(reply: list[Any]) -> tuple[Decision, int, int]:
    """The script's reply: the decision, the tokens and the monthly counts granted."""
    outcome, wait, retry, remaining, reset, used, blocked, created, extra, allowance = (
        int(v) for v in reply
    )
    decision = Decision(
        Outcome(outcome), wait, retry, remaining, reset, used, bool(blocked), bool(created)
    )
    return decision, extra, allowance
