"""Pure rules of the audit log."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from server.domain.common.listing import FilterField, ListSpec, OrderKey

#: A user's own activity log.
ACTIVITY_LIST_SPEC = ListSpec(
    filter_fields={
        "action": FilterField("string"),
        "outcome": FilterField("string"),
        "create_time": FilterField("timestamp"),
    },
    order_fields=frozenset({"create_time"}),
    default_order=(OrderKey("create_time", descending=True),),
)

_WORD_START = re.compile(r"(?<!^)(?=[A-Z])")


def action_name(full_method: str) -> str:
    """``/tunnelplane.v1.AuthService/Login`` -> ``auth.login``."""
    service, _, method = full_method.strip("/").rpartition("/")
    area = service.rpartition(".")[2].removesuffix("Service").lower()
    area = {"user": "users"}.get(area, area)
    return f"{area}.{_WORD_START.sub('_', method).lower()}"


# --- the hash chain ----------------------------------------------------------------------

#: The fields of an entry its content hash covers, in the stored form.
CHAINED_FIELDS = (
    "id",
    "time",
    "request_id",
    "method",
    "action",
    "outcome",
    "reason",
    "actor_user_id",
    "api_key_id",
    "subject_user_id",
    "resource",
    "ip_address",
    "user_agent",
    "details",
)


def chain_day(time: datetime) -> str:
    """The chain an entry of ``time`` joins: one per UTC day (``2026-12-05``)."""
    return time.astimezone(UTC).date().isoformat()


def genesis(day: str) -> str:
    """What the first entry of a day's chain links to."""
    return hashlib.sha256(f"tunnelplane-audit:{day}".encode()).hexdigest()


def content_hash(row: Mapping[str, Any]) -> str:
    """SHA-256 of an entry's stored fields, canonically encoded (JSON, sorted keys, the
    time in UTC to the microsecond)."""
    fields = {name: row[name] for name in CHAINED_FIELDS}
    fields["time"] = row["time"].astimezone(UTC).isoformat(timespec="microseconds")
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def link(previous: str, seq: int, content: str) -> str:
    """An entry's hash: its place in the chain, bound to the one before it."""
    return hashlib.sha256(f"{previous}:{seq}:{content}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ChainedRow:
    """An entry as the verifier reads it back."""

    id: str
    day: str
    seq: int
    prev_hash: str
    content_hash: str
    hash: str
    erased: bool
    fields: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class BrokenLink:
    """The first place a day's chain does not hold, and why."""

    entry_id: str
    day: str
    seq: int
    problem: str


class ChainCheck:
    """Checks one day's chain, fed its entries in ``seq`` order a batch at a time: each
    entry's content matches its content hash (unless erased: then only the stored content
    hash is kept), it links to the entry before it, the sequence has no hole, and the
    last entry is the day's head."""

    def __init__(self, day: str) -> None:
        self.day = day
        self.checked = 0
        self._previous = genesis(day)
        self._last_id = ""

    def feed(self, rows: Sequence[ChainedRow]) -> BrokenLink | None:
        """The first break among ``rows``, if any."""
        for row in rows:
            expected = self.checked + 1
            problem = ""
            if row.seq != expected:
                problem = f"entry {expected} is missing"
            elif row.prev_hash != self._previous:
                problem = "does not link to the entry before it"
            elif not row.erased and content_hash(row.fields) != row.content_hash:
                problem = "its content was changed"
            elif link(self._previous, row.seq, row.content_hash) != row.hash:
                problem = "its hash does not match"
            if problem:
                return BrokenLink(row.id, self.day, row.seq, problem)
            self._previous, self._last_id, self.checked = row.hash, row.id, expected
        return None

    def finish(self, head: tuple[int, str] | None) -> BrokenLink | None:
        """Whether the chain ends where its head says (entries removed from its end)."""
        if head is not None and head != (self.checked, self._previous):
            return BrokenLink(
                self._last_id, self.day, self.checked + 1, "the chain ends before its head"
            )
        return None
