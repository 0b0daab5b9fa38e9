"""A long-running operation (AIP-151) and what one step of it did."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class Operation:
    """A piece of long work."""

    id: str
    user_id: str
    kind: str
    target: str
    params: Mapping[str, Any]
    create_time: datetime
    update_time: datetime
    cursor: str = ""
    processed: int = 0
    total: int = 0
    done: bool = False
    result: Mapping[str, Any] | None = None
    error_code: int = 0
    error_message: str = ""
    request_id: str | None = None
    lease_until: datetime | None = None
    end_time: datetime | None = None

    @property
    def name(self) -> str:
        """``users/{user}/operations/{operation}``."""
        return f"users/{self.user_id}/operations/{self.id}"


@dataclass(frozen=True, slots=True)
class Step:
    """What one step of an operation did: the new cursor, items done, and whether the
    work is finished (then ``result`` is its response)."""

    cursor: str
    processed: int
    finished: bool
    result: Mapping[str, Any] | None = None
