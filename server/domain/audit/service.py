"""Recording a call's audit entry, explicitly, in the use case that serves it.

A use case that changes state takes the call's :class:`AuditTrail` (``None``: the call is
not audited, as for a background job or a method whose policy does not say ``audited``)
and records the entry in the same unit of work as its change, so the change and its record
commit or roll back together. What it learns on the way that the entry should say even if
the call then fails (the account a sign-in was for) it notes first; the audit stage records
a failed call with those notes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from server.domain.audit.model import AuditTrail
from server.domain.unit_of_work import UnitOfWork


async def record(
    uow: UnitOfWork,
    trail: AuditTrail | None,
    now: datetime,
    *,
    subject_user_id: str = "",
    resource: str = "",
    **details: Any,
) -> None:
    """Note these facts and add the call's entry (outcome ``OK``) to ``uow``. A call has
    one entry (its id is the trail's), so a use case records it once."""
    if trail is None:
        return
    trail.note(subject_user_id=subject_user_id, resource=resource, **details)
    await uow.audit.add(trail.entry(now, "OK"))
    trail.added = True


def note(
    trail: AuditTrail | None, *, subject_user_id: str = "", resource: str = "", **details: Any
) -> None:
    """Add facts to the call's entry without recording it (nothing when not audited)."""
    if trail is not None:
        trail.note(subject_user_id=subject_user_id, resource=resource, **details)


def actor(trail: AuditTrail | None) -> str:
    """The caller of the call ``trail`` audits, as an event's actor ("" if not known)."""
    return trail.context.actor if trail is not None else ""
