"""Roles, permissions and who is calling.

A role grants a fixed set of permissions. An API key narrows its owner's permissions to
its scopes. Owners always act on their own resources; acting on someone else's needs the
method's admin permission. :func:`authorize` is the one place that decides.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from server.errors import PermissionDenied, Unauthenticated


class Role(enum.StrEnum):
    """A role. Values are stored and put in tokens."""

    USER = "user"
    SUPER_ADMIN = "super_admin"
    SUPPORT_ADMIN = "support_admin"
    FINANCE_ADMIN = "finance_admin"
    SERVICE = "service"
    AGENT = "agent"


class Tier(enum.StrEnum):
    """A service tier, lowest first."""

    FREE = "free"
    PREMIUM = "premium"
    ENTERPRISE = "enterprise"

    @property
    def rank(self) -> int:
        """Position in the order free < premium < enterprise."""
        return list(Tier).index(self)


class CredentialKind(enum.StrEnum):
    """How a caller authenticated."""

    SESSION = "session"
    API_KEY = "api_key"


#: What a user may do to their own resources.
SELF_PERMISSIONS = frozenset(
    {
        "profile.read",
        "profile.write",
        "apikeys.read",
        "apikeys.write",
        "tunnels.read",
        "tunnels.write",
        "webhooks.read",
        "webhooks.write",
    }
)
#: Permissions over other users' resources and the system.
ADMIN_PERMISSIONS = frozenset(
    {
        "users.read",
        "users.write",
        "users.admin",
        "tunnels.admin",
        "webhooks.admin",
        "billing.read",
        "billing.write",
        "audit.read",
        "config.write",
        "system.read",
    }
)
#: The scope of an agent key: an API key that can do nothing but carry its owner's tunnels.
AGENT_SCOPE = "agent.connect"
AGENT_PERMISSIONS = frozenset({AGENT_SCOPE})
ALL_PERMISSIONS = SELF_PERMISSIONS | ADMIN_PERMISSIONS | AGENT_PERMISSIONS

ROLE_PERMISSIONS: Mapping[Role, frozenset[str]] = {
    Role.USER: SELF_PERMISSIONS,
    Role.SUPPORT_ADMIN: SELF_PERMISSIONS
    | {"users.read", "users.write", "tunnels.admin", "webhooks.admin", "audit.read", "system.read"},
    Role.FINANCE_ADMIN: SELF_PERMISSIONS | {"users.read", "billing.read", "billing.write"},
    Role.SUPER_ADMIN: ALL_PERMISSIONS,
    Role.SERVICE: SELF_PERMISSIONS | {"users.read", "billing.read"},
    Role.AGENT: frozenset({"profile.read"}) | AGENT_PERMISSIONS,
}

#: Roles whose accounts authenticate with API keys only, never with a password.
KEY_ONLY_ROLES = frozenset({Role.SERVICE, Role.AGENT})


def is_agent_key(scopes: frozenset[str] | None) -> bool:
    """Whether an API key's scopes make it an agent key (the agent role, nothing else)."""
    return scopes == AGENT_PERMISSIONS


def permissions_for(role: Role, scopes: frozenset[str] | None = None) -> frozenset[str]:
    """The permissions of a role, narrowed to ``scopes`` when given (an API key).

    An agent key (scoped to ``agent.connect`` alone) acts with the agent role whatever its
    owner's role: it may only carry the owner's tunnels.
    """
    if is_agent_key(scopes):
        return AGENT_PERMISSIONS
    granted = ROLE_PERMISSIONS[role]
    return granted if not scopes else granted & scopes


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller."""

    user_id: str
    role: Role
    tier: Tier
    credential: CredentialKind
    permissions: frozenset[str]
    session_id: str = ""
    token_id: str = ""
    token_expires_at: float = 0.0
    api_key_id: str = ""
    #: The one tunnel an agent key may serve ("" for any of its owner's).
    bound_tunnel: str = ""

    def has(self, permission: str) -> bool:
        """Whether the caller holds ``permission``."""
        return permission in self.permissions

    @property
    def user_name(self) -> str:
        """``users/{id}``."""
        return f"users/{self.user_id}"


class ShareRole(enum.IntEnum):
    """What a share grants on someone else's resource; each includes those below it."""

    NONE = 0
    READ = 1
    WRITE = 2
    ADMIN = 3


@dataclass(frozen=True, slots=True)
class Rule:
    """The authorization part of a method's policy, in domain terms."""

    public: bool
    permission: str = ""
    owner_field: str = ""
    admin_permission: str = ""
    min_tier: Tier | None = None
    credentials: frozenset[CredentialKind] = frozenset(CredentialKind)
    #: The share role that lets a non-owner without the admin permission call anyway.
    share_role: ShareRole = ShareRole.NONE


def needs_share_lookup(rule: Rule, principal: Principal | None, owner_id: str | None) -> bool:
    """Whether only a share could let ``principal`` act on the resource (so look one up)."""
    return (
        principal is not None
        and rule.share_role is not ShareRole.NONE
        and owner_id != principal.user_id
        and not principal.has(rule.admin_permission)
    )


def authorize(
    rule: Rule,
    principal: Principal | None,
    owner_id: str | None,
    share: ShareRole = ShareRole.NONE,
) -> None:
    """Allow or refuse a call; raise :class:`Unauthenticated` or :class:`PermissionDenied`.

    ``owner_id`` is the owner of the resource named by ``rule.owner_field`` (``None`` when
    the method names no resource); ``share`` is the caller's share role on that resource.
    """
    if principal is None:
        if rule.public:
            return
        raise Unauthenticated("this method needs credentials", reason="CREDENTIALS_MISSING")
    if principal.credential not in rule.credentials:
        raise PermissionDenied(
            f"this method does not accept {principal.credential.value} credentials",
            reason="CREDENTIAL_KIND_NOT_ALLOWED",
        )
    if rule.permission and not principal.has(rule.permission):
        raise PermissionDenied(
            f"missing permission {rule.permission}",
            reason="PERMISSION_MISSING",
            metadata={"permission": rule.permission},
        )
    acting_for_other = bool(rule.owner_field) and owner_id != principal.user_id
    shared = rule.share_role is not ShareRole.NONE and share >= rule.share_role
    if acting_for_other:
        needed = rule.admin_permission
        if shared:
            return
        if not needed or not principal.has(needed):
            raise PermissionDenied(
                "the resource belongs to someone else",
                reason="NOT_OWNER",
                metadata={"permission": needed} if needed else None,
            )
    # Tier gating is about the caller's own plan; an administrator acting on someone
    # else's resource is not held to it.
    if acting_for_other or rule.min_tier is None:
        return
    if principal.tier.rank < rule.min_tier.rank:
        raise PermissionDenied(
            f"this method needs the {rule.min_tier.value} tier or higher",
            reason="TIER_TOO_LOW",
            metadata={"required_tier": rule.min_tier.value, "tier": principal.tier.value},
        )
