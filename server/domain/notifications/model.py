"""What a notice says."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class Severity(enum.StrEnum):
    """How urgent a notice is."""

    CRITICAL = "critical"
    WARNING = "warning"
    #: A condition that raised a notice has cleared.
    RESOLVED = "resolved"


@dataclass(frozen=True, slots=True)
class Notice:
    """One message to a channel or a user."""

    #: Stable per condition (``dependency_down:redis``) or event (``event:evt_...``): what
    #: de-duplication keys on.
    key: str
    severity: Severity
    summary: str
    time: datetime
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def subject(self) -> str:
        """An email subject line."""
        return f"[Tunnelplane {self.severity.value}] {self.summary}"[:200]
