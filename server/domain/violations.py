"""The rate-limit violation log: every refusal counted, none written one by one.

Refusals are aggregated in memory per minute, subject, address, method and policy, and
written every few seconds as upserts of counts, so an attack costs the database a
bounded number of rows per interval, not one per refused call. Past a cap on distinct
keys per interval, refusals are folded into one ``*`` row per method and policy. The
first refusal of each key per interval is also logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from server.domain.clock import Clock
from server.domain.listing import FilterField, Lister, ListSpec, OrderKey, Page
from server.domain.ports import UnitOfWorkFactory

RETENTION = timedelta(days=30)
MAX_KEYS = 2_000
OTHER = "*"

LIST_SPEC = ListSpec(
    filter_fields={
        "subject": FilterField("string"),
        "ip_address": FilterField("string"),
        "method": FilterField("string"),
        "policy": FilterField("string"),
        "window_start": FilterField("timestamp"),
    },
    order_fields=frozenset({"window_start"}),
    default_order=(OrderKey("window_start", descending=True),),
)


@dataclass(frozen=True, slots=True)
class ViolationRecord:
    """Refusals of one key in one minute."""

    id: str
    window_start: datetime
    subject: str
    ip_address: str
    method: str
    policy: str
    count: int


@dataclass(frozen=True, slots=True)
class Summary:
    """The most-refused subjects, methods and addresses over a window."""

    total: int
    subjects: list[tuple[str, int]]
    methods: list[tuple[str, int]]
    addresses: list[tuple[str, int]]


Key = tuple[float, str, str, str, str]


def record_id(key: Key) -> str:
    """A stable id per aggregation key (the upsert target)."""
    text = "|".join(str(part) for part in key)
    return hashlib.blake2s(text.encode(), digest_size=12).hexdigest()


class ViolationLog:
    """Counts refusals and writes them in aggregate."""

    def __init__(
        self,
        uow: UnitOfWorkFactory,
        lister: Lister,
        clock: Clock,
        log: logging.Logger,
        *,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self._uow = uow
        self._lister = lister
        self._clock = clock
        self._log = log
        self._max_keys = max_keys
        self._counts: Counter[Key] = Counter()

    def record(self, subject: str, ip: str, method: str, policy: str) -> None:
        """Count one refusal (no I/O)."""
        minute = (self._clock.time() // 60) * 60
        key: Key = (minute, subject, ip, method, policy)
        if key not in self._counts:
            if len(self._counts) >= self._max_keys:
                key = (minute, OTHER, OTHER, method, policy)
            else:
                self._log.warning(
                    "rate limit refusal",
                    extra={"subject": subject, "client_ip": ip, "method": method, "policy": policy},
                )
        self._counts[key] += 1

    @property
    def pending(self) -> int:
        """Distinct keys waiting to be written."""
        return len(self._counts)

    async def flush(self) -> int:
        """Write what was counted since the last flush; returns how many rows."""
        counts, self._counts = self._counts, Counter()
        records = [
            ViolationRecord(
                record_id(key),
                datetime.fromtimestamp(key[0], UTC),
                key[1],
                key[2],
                key[3],
                key[4],
                count,
            )
            for key, count in counts.items()
        ]
        if records:
            async with self._uow() as uow:
                await uow.violations.add_counts(records)
        return len(records)

    async def run(self, interval: float) -> None:
        """Flush every ``interval`` seconds, and drop entries past retention hourly."""
        ticks = 0
        while True:
            await asyncio.sleep(interval)
            try:
                await self.flush()
                ticks += 1
                if ticks * interval >= 3600:
                    ticks = 0
                    async with self._uow() as uow:
                        await uow.violations.delete_before(self._clock.now() - RETENTION)
            except Exception:  # noqa: BLE001 - a failed write is logged and retried
                self._log.exception("could not write rate-limit violations; will retry")

    async def list(self, *, page_size: int, page_token: str, filter: str) -> Page[ViolationRecord]:  # noqa: A002
        """A page of aggregated refusals, newest first."""
        query = self._lister.query(
            LIST_SPEC, page_size=page_size, page_token=page_token, filter=filter
        )
        async with self._uow(readonly=True) as uow:
            rows = await uow.violations.list(query)
        return self._lister.page(query, rows, lambda r: (r.window_start, r.id))

    async def summarize(self, window: timedelta, top: int) -> Summary:
        """Totals and the top keys since ``window`` ago."""
        since = self._clock.now() - window
        async with self._uow(readonly=True) as uow:
            return Summary(
                await uow.violations.total(since),
                await uow.violations.top("subject", since, top),
                await uow.violations.top("method", since, top),
                await uow.violations.top("ip_address", since, top),
            )
