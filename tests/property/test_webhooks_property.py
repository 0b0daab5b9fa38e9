"""Webhook laws (server/domain/webhooks/rules.py): retry delays stay within the jittered schedule
and above a capped Retry-After; filters match like a reference implementation; every
signature verifies (ours and the independent ``standardwebhooks``) and any flipped bit
of the body breaks it."""

from __future__ import annotations

import base64
import random
import re
import time
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from server.domain.webhooks import rules as wh

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
DAY = timedelta(hours=24)

secrets = st.binary(min_size=24, max_size=64).map(lambda b: "whsec_" + base64.b64encode(b).decode())
seeds = st.integers(min_value=0, max_value=2**32)
schedules = st.lists(
    st.integers(min_value=0, max_value=10 * 86400).map(lambda s: timedelta(seconds=s)), max_size=10
)
msg_ids = st.text(min_size=1, max_size=40)
timestamps = st.integers(min_value=0, max_value=2**37)  # datetime stops at year 9999
segments = st.sampled_from(["tunnel", "user", "key", "created", "a", "ab"])
event_types = st.lists(segments, min_size=1, max_size=4).map(".".join)
prefixes = st.lists(segments, min_size=1, max_size=3).map(lambda s: ".".join(s) + ".*")
filters = st.one_of(event_types, st.just("*"), prefixes)


@given(schedules, st.integers(min_value=1, max_value=12), seeds)
def test_delay_is_the_scheduled_one_within_20_percent(
    schedule: list[timedelta], attempt: int, seed: int
) -> None:
    due = wh.next_attempt(attempt, NOW, rng=_seeded(seed), schedule=schedule)
    if attempt > len(schedule):
        assert due is None
        return
    assert due is not None
    base = schedule[attempt - 1]
    assert timedelta(0) <= due - NOW
    assert base * 0.8 - timedelta(microseconds=1) <= due - NOW
    assert due - NOW <= base * 1.2 + timedelta(microseconds=1)


@given(st.integers(min_value=1, max_value=len(wh.RETRY_SCHEDULE) - 1))
def test_default_schedule_bounds_never_decrease(attempt: int) -> None:
    low = [wh.next_attempt(attempt + i, NOW, rng=_Fixed(0.0)) for i in (0, 1)]
    high = [wh.next_attempt(attempt + i, NOW, rng=_Fixed(1.0)) for i in (0, 1)]
    assert None not in low
    assert None not in high
    assert low[0] <= low[1]  # type: ignore[operator]
    assert high[0] <= high[1]  # type: ignore[operator]


@given(
    schedules.filter(bool),
    seeds,
    st.floats(min_value=-1e9, max_value=1e9, allow_nan=False),
    st.data(),
)
def test_retry_after_is_a_lower_bound_capped_at_a_day(
    schedule: list[timedelta], seed: int, retry_after: float, data: st.DataObject
) -> None:
    attempt = data.draw(st.integers(min_value=1, max_value=len(schedule)))
    due = wh.next_attempt(
        attempt, NOW, rng=_seeded(seed), retry_after=retry_after, schedule=schedule
    )
    assert due is not None
    floor = min(timedelta(seconds=max(retry_after, 0)), DAY)
    assert due - NOW >= floor
    assert due - NOW <= max(floor, schedule[attempt - 1] * 1.2 + timedelta(microseconds=1))


def _reference_match(pattern: str, event_type: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith(".*"):
        return re.fullmatch(re.escape(pattern[:-2]) + r"(\.[^.]+)+", event_type) is not None
    return pattern == event_type


@given(st.lists(filters, max_size=5), event_types)
def test_matches_agrees_with_the_reference(patterns: list[str], event_type: str) -> None:
    expected = not patterns or any(_reference_match(p, event_type) for p in patterns)
    assert wh.matches(patterns, event_type) is expected


@given(st.lists(filters, max_size=60))
def test_validated_filters_match_as_the_raw_ones(patterns: list[str]) -> None:
    known = frozenset(p for p in patterns if "*" not in p) | {"tunnel.created"}
    if len(patterns) > wh.MAX_FILTERS or any(
        p != "*" and p.endswith(".*") and not any(k.startswith(p[:-1]) for k in known)
        for p in patterns
    ):
        return
    kept = wh.validate_filters(patterns, known)
    assert len(set(kept)) == len(kept) == len(set(patterns))
    for event_type in known:
        assert wh.matches(kept, event_type) is wh.matches(patterns, event_type)


@given(st.lists(secrets, min_size=1, max_size=3, unique=True), msg_ids, timestamps, st.binary())
def test_every_signing_secret_verifies(
    keys: list[str], msg_id: str, stamp: int, body: bytes
) -> None:
    sent = wh.headers(keys, msg_id, stamp, body)
    for key in keys:
        wh.verify(key, sent, body, datetime.fromtimestamp(stamp, UTC))


@given(secrets, msg_ids, timestamps, st.binary(min_size=1), st.data())
def test_any_flipped_body_bit_fails(
    key: str, msg_id: str, stamp: int, body: bytes, data: st.DataObject
) -> None:
    bit = data.draw(st.integers(min_value=0, max_value=len(body) * 8 - 1))
    flipped = bytearray(body)
    flipped[bit // 8] ^= 1 << (bit % 8)
    sent = wh.headers([key], msg_id, stamp, body)
    with pytest.raises(wh.SignatureInvalid):
        wh.verify(key, sent, bytes(flipped), datetime.fromtimestamp(stamp, UTC))


@given(secrets, secrets, msg_ids, st.text())
def test_independent_library_verifies_and_refuses_other_keys(
    key: str, other: str, msg_id: str, text: str
) -> None:
    body = text.encode()
    sent = wh.headers([key], msg_id, int(time.time()), body)
    Webhook(key).verify(body, sent, json_parse=False)
    if wh.parse_secret(other) != wh.parse_secret(key):
        with pytest.raises(WebhookVerificationError):
            Webhook(other).verify(body, sent, json_parse=False)


def _seeded(seed: int) -> random.Random:
    return random.Random(seed)  # noqa: S311 - jitter, not a secret


class _Fixed(random.Random):
    """An rng whose ``uniform`` always returns one end of the range (0.0 low, 1.0 high)."""

    def __init__(self, end: float) -> None:
        super().__init__(0)
        self.end = end

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.end
