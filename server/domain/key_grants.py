"""Which API keys a credential may hand out: never one that can do more than it can.

A key acts with its *effective permissions*: its scopes within its owner's role (the whole
role when it has no scopes; only ``agent.connect`` for an agent key). A caller acts with
its own: a session with its user's role, an API key with its scopes within that role.
Creating a key, or rotating one (which hands over a working secret for it), is allowed
only when every effective permission of that key is one the caller holds. Reading keys
(they never show a secret) and revoking them (which takes power away) are not limited.
"""

from __future__ import annotations

from collections.abc import Iterable

from server.domain.principal import AGENT_PERMISSIONS, Role, permissions_for
from server.errors import PermissionDenied

#: Carrying the owner's tunnels (an agent key) is part of what writing them allows.
_IMPLIED = {"tunnels.write": AGENT_PERMISSIONS}
REASON = "SCOPE_ESCALATION"


def key_permissions(owner_role: Role, scopes: Iterable[str]) -> frozenset[str]:
    """What a key of an ``owner_role`` owner with ``scopes`` may do."""
    return permissions_for(owner_role, frozenset(scopes) or None)


def grantable(caller: frozenset[str]) -> frozenset[str]:
    """The permissions a caller holding ``caller`` may put in a key."""
    implied = (extra for held, extra in _IMPLIED.items() if held in caller)
    return caller.union(*implied)


def beyond(caller: frozenset[str], owner_role: Role, scopes: Iterable[str]) -> frozenset[str]:
    """The key's permissions that the caller does not hold (empty: it may have the key)."""
    return key_permissions(owner_role, scopes) - grantable(caller)


def check_grant(
    caller: frozenset[str], owner_role: Role, scopes: Iterable[str], action: str
) -> None:
    """Raise ``PERMISSION_DENIED`` (``SCOPE_ESCALATION``) if the caller may not ``action``
    (``create``, ``rotate``) a key of an ``owner_role`` owner with ``scopes``."""
    missing = beyond(caller, owner_role, scopes)
    if missing:
        raise PermissionDenied(
            f"cannot {action} an API key that may do more than the caller's own credential",
            reason=REASON,
            metadata={"missing_permissions": ",".join(sorted(missing))},
        )
