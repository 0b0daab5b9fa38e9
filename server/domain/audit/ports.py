"""What the audit log needs from storage."""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import Protocol

from server.domain.audit.model import AuditEntry
from server.domain.common.listing import ListQuery


class AuditRepository(Protocol):
    """The audit log."""

    async def add(self, entry: AuditEntry) -> None: ...
    async def add_many(self, entries: Sequence[AuditEntry]) -> None: ...
    async def set_outcome(self, entry_id: str, outcome: str, reason: str) -> bool:
        """Correct an entry's outcome; whether there is such an entry."""
        ...

    async def list_for_user(self, user_id: str, query: ListQuery) -> builtins.list[AuditEntry]: ...
    async def erase_user(self, user_id: str) -> None: ...
