"""What the audit log needs from storage."""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from server.domain.audit.model import AuditEntry
from server.domain.audit.rules import ChainedRow
from server.domain.common.listing import ListQuery


class AuditRepository(Protocol):
    """The audit log."""

    async def add(self, entry: AuditEntry) -> None: ...
    async def add_many(self, entries: Sequence[AuditEntry]) -> None: ...
    async def exists(self, entry_id: str) -> bool:
        """Whether the log holds this entry."""
        ...

    async def heads(self, start: str, end: str) -> dict[str, tuple[int, str]]: ...
    async def chain_days(self, start: str, end: str) -> builtins.list[str]: ...
    async def chained(self, day: str, after_seq: int, limit: int) -> builtins.list[ChainedRow]: ...
    async def unchained(self, start: datetime, end: datetime) -> int: ...

    async def list_for_user(self, user_id: str, query: ListQuery) -> builtins.list[AuditEntry]: ...
    async def erase_user(self, user_id: str) -> None: ...
