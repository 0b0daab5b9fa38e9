"""An audit record, the call it is about, and the trail that collects it while the call is
served."""

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
    #: Where the entry sits in its day's chain (read back from storage; empty before).
    chain_day: str = ""
    chain_seq: int = 0
    hash: str = ""
    erased: bool = False


@dataclass(frozen=True, slots=True)
class RequestContext:
    """The call being served as its audit entry names it: the method, who made it (once
    authenticated) and from where."""

    method: str
    action: str
    request_id: str = ""
    ip_address: str = ""
    user_agent: str = ""
    actor_user_id: str = ""
    api_key_id: str = ""

    @property
    def actor(self) -> str:
        """The caller as an event's actor: ``users/{id}``, or "" for an anonymous call."""
        return f"users/{self.actor_user_id}" if self.actor_user_id else ""


@dataclass(slots=True)
class AuditTrail:
    """The one audit entry of an audited call, while the call is served.

    The transport's audit stage opens it and the servicer hands it to the use case, which
    notes what only it knows (whose account, which resource) and records the entry in the
    unit of work of its change (:func:`server.domain.audit.service.record`). A call that
    fails is recorded by the stage with what was noted.
    """

    context: RequestContext
    subject_user_id: str = ""
    resource: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    #: The id of the call's one entry, whoever writes it.
    id: str = field(default_factory=lambda: new_id("aud"))
    #: Whether a use case added the entry to a unit of work (which may have rolled back).
    added: bool = False

    def note(self, *, subject_user_id: str = "", resource: str = "", **details: Any) -> None:
        """Add facts to the entry (an empty value leaves the fact as it was)."""
        if subject_user_id:
            self.subject_user_id = subject_user_id
        if resource:
            self.resource = resource
        self.details.update(details)

    def entry(self, now: datetime, outcome: str, reason: str = "") -> AuditEntry:
        """The record with ``outcome`` (``OK`` or a status code name). Its subject is the
        caller unless the use case named another."""
        context = self.context
        return AuditEntry(
            id=self.id,
            time=now,
            method=context.method,
            action=context.action,
            outcome=outcome,
            request_id=context.request_id,
            reason=reason,
            actor_user_id=context.actor_user_id,
            api_key_id=context.api_key_id,
            subject_user_id=self.subject_user_id or context.actor_user_id,
            resource=self.resource,
            ip_address=context.ip_address,
            user_agent=context.user_agent,
            details=dict(self.details),
        )
