"""What operations need from storage."""

from __future__ import annotations

import builtins
from datetime import datetime
from typing import Protocol

from server.domain.common.listing import ListQuery
from server.domain.operations.model import Operation


class OperationRepository(Protocol):
    """Long-running operations."""

    async def add(self, operation: Operation) -> None: ...
    async def get(self, operation_id: str, *, lock: bool = False) -> Operation | None: ...
    async def find_by_request(self, user_id: str, request_id: str) -> Operation | None: ...
    async def list(self, user_id: str, query: ListQuery) -> builtins.list[Operation]: ...
    async def claim(self, now: datetime, lease_until: datetime) -> Operation | None: ...
    async def save(self, operation: Operation) -> None: ...
