"""The audit scope of the call being served, shared through a context variable.

The call pipeline opens a scope for every audited call. The first unit of work that
commits while the scope is open writes the scope's entry (outcome ``OK``) in the same
transaction, so a change and its audit record land together. If the call then fails, the
pipeline corrects that entry's outcome; if it fails before any commit, the pipeline
writes the failure in a transaction of its own. Domain code adds what only it knows
(whose account a sign-in was for, which resource was made) with :func:`annotate`.
"""

from __future__ import annotations

import contextvars
import re
from typing import Any

from server.domain.audit.model import AuditScope

_scope: contextvars.ContextVar[AuditScope | None] = contextvars.ContextVar(
    "audit_scope", default=None
)


def current() -> AuditScope | None:
    """The scope of the call being served, if it is audited."""
    return _scope.get()


def open_scope(scope: AuditScope) -> contextvars.Token[AuditScope | None]:
    """Make ``scope`` current; pass the token to :func:`close_scope`."""
    return _scope.set(scope)


def close_scope(token: contextvars.Token[AuditScope | None]) -> None:
    """Restore the previous scope."""
    _scope.reset(token)


def annotate(
    *, subject_user_id: str = "", resource: str = "", action: str = "", **details: Any
) -> None:
    """Add facts to the current call's audit entry; does nothing when not audited."""
    scope = _scope.get()
    if scope is None:
        return
    if subject_user_id:
        scope.subject_user_id = subject_user_id
    if resource:
        scope.resource = resource
    if action:
        scope.action = action
    scope.details.update(details)


def action_name(full_method: str) -> str:
    """``/tunnelplane.v1.AuthService/Login`` -> ``auth.login``."""
    service, _, method = full_method.strip("/").rpartition("/")
    area = service.rpartition(".")[2].removesuffix("Service").lower()
    area = {"user": "users"}.get(area, area)
    return f"{area}.{re.sub(r'(?<!^)(?=[A-Z])', '_', method).lower()}"


def set_actor(user_id: str, api_key_id: str = "") -> None:
    """Record who is acting in the current call's audit entry."""
    scope = _scope.get()
    if scope is not None:
        scope.actor_user_id = user_id
        scope.api_key_id = api_key_id
