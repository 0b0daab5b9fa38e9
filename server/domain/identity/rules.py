"""Identity rules: what each role may do and the one decision that allows or refuses a
call (:func:`authorize`); which API keys a credential may hand out (never one that can do
more than it can); the format of API-key secrets; refresh-token hashes and user etags.

A role grants a fixed set of permissions. An API key narrows its owner's permissions to
its scopes. Owners always act on their own resources; acting on someone else's needs the
method's admin permission. Pure functions, no I/O.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from server.domain.common.errors import PermissionDenied, Unauthenticated
from server.domain.identity.model import (
    ApiKey,
    CredentialKind,
    Principal,
    Profile,
    Role,
    ShareRole,
    Tier,
    User,
)

# --- roles, permissions and the one decision -------------------------------------------

#: Reaching one's own tunnels, and those shared with one, through a streaming proxy.
TUNNEL_USE = "tunnels.use"
#: What a user may do to their own resources.
SELF_PERMISSIONS = frozenset(
    {
        "profile.read",
        "profile.write",
        "apikeys.read",
        "apikeys.write",
        "tunnels.read",
        "tunnels.write",
        TUNNEL_USE,
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
        "users.suspend",
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
    | {
        "users.read",
        "users.write",
        "users.suspend",
        "tunnels.admin",
        "webhooks.admin",
        "audit.read",
        "system.read",
    },
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


# --- which API keys a credential may hand out ------------------------------------------
#
# A key acts with its *effective permissions*: its scopes within its owner's role (the whole
# role when it has no scopes; only ``agent.connect`` for an agent key). A caller acts with
# its own: a session with its user's role, an API key with its scopes within that role.
# Creating a key, or rotating one (which hands over a working secret for it), is allowed
# only when every effective permission of that key is one the caller holds. Reading keys
# (they never show a secret) and revoking them (which takes power away) are not limited.

#: Carrying the owner's tunnels (an agent key) is part of what writing them allows.
_IMPLIED = {"tunnels.write": AGENT_PERMISSIONS}
SCOPE_ESCALATION = "SCOPE_ESCALATION"


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
            reason=SCOPE_ESCALATION,
            metadata={"missing_permissions": ",".join(sorted(missing))},
        )


# --- API-key secrets: tp_ + 32 random base62 characters + a 6-character CRC32 checksum -

PREFIX = "tp_"
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
BODY_LENGTH = 32
CHECKSUM_LENGTH = 6
_FORMAT = re.compile(rf"^tp_[0-9A-Za-z]{{{BODY_LENGTH + CHECKSUM_LENGTH}}}$")


def _base62(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        value, digit = divmod(value, 62)
        chars.append(_BASE62[digit])
    return "".join(reversed(chars))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32((PREFIX + body).encode()), CHECKSUM_LENGTH)


def generate_secret() -> str:
    """A new key secret."""
    body = "".join(secrets.choice(_BASE62) for _ in range(BODY_LENGTH))
    return PREFIX + body + _checksum(body)


def looks_like_key(secret: str) -> bool:
    """Whether ``secret`` has the key format and a valid checksum."""
    if not _FORMAT.match(secret):
        return False
    body = secret[len(PREFIX) : len(PREFIX) + BODY_LENGTH]
    return secrets.compare_digest(secret[-CHECKSUM_LENGTH:], _checksum(body))


def hash_secret(secret: str) -> str:
    """The stored form of a secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def display_prefix(secret: str) -> str:
    """The part of a secret shown to help people recognise it."""
    return secret[: len(PREFIX) + 6]


def state_of(key: ApiKey, now: datetime) -> str:
    """``active``, ``expired`` or ``revoked``."""
    if key.revoke_time is not None:
        return "revoked"
    if key.expire_time is not None and key.expire_time <= now:
        return "expired"
    return "active"


# --- refresh tokens and users ----------------------------------------------------------


def hash_refresh_token(secret: str) -> str:
    """Stored form of a refresh token."""
    return hashlib.sha256(secret.encode()).hexdigest()


def etag_of(user: User) -> str:
    """Opaque version tag of a user (AIP-154)."""
    digest = hashlib.blake2s(f"{user.id}:{user.version}".encode(), digest_size=8).hexdigest()
    return f'W/"{digest}"'


def profile_of(user: User) -> Profile:
    """The user-editable part of a user."""
    return Profile(user.display_name, user.preferences)
