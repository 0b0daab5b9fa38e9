"""An audit record, and the scope that collects it while a call is served."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from server.domain.common.ids import new_id


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audit record: who did what to which resource, from where, with what outcome."""

    id: str
    time: datetime
    method: str
    action: str
    outcome: str
    request_id: str = ""
    reason: str = ""
    actor_user_id: str = ""
    api_key_id: str = ""
    subject_user_id: str = ""
    resource: str = ""
    ip_address: str = ""
    user_agent: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class AuditScope:
    """What the audit entry of the current call will say."""

    method: str
    action: str
    request_id: str = ""
    ip_address: str = ""
    user_agent: str = ""
    actor_user_id: str = ""
    api_key_id: str = ""
    subject_user_id: str = ""
    resource: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    #: Id of the entry written by a commit during the call, if one was.
    recorded_id: str = ""

    def entry(self, now: datetime, outcome: str, reason: str = "") -> AuditEntry:
        """The record for this scope with ``outcome`` (``OK`` or a status code name)."""
        return AuditEntry(
            id=self.recorded_id or new_id("aud"),
            time=now,
            method=self.method,
            action=self.action,
            outcome=outcome,
            request_id=self.request_id,
            reason=reason,
            actor_user_id=self.actor_user_id,
            api_key_id=self.api_key_id,
            subject_user_id=self.subject_user_id or self.actor_user_id,
            resource=self.resource,
            ip_address=self.ip_address,
            user_agent=self.user_agent,
            details=dict(self.details),
        )
