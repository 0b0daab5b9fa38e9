"""Identity's records: roles, tiers and who is calling; users, sessions and API keys.

Plain frozen dataclasses and enums, free of any transport or storage type.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

# --- who is calling --------------------------------------------------------------------


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


# --- tiers -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TierLimits:
    """Limits of one tier; ``-1`` means unlimited."""

    requests_per_minute: int
    max_tunnels: int
    max_concurrent_connections: int
    requests_per_month: int
    transfer_bytes_per_month: int
    #: Calls allowed at once above the steady rate (the GCRA burst).
    burst: int
    #: Watch streams (WatchTunnels) one user may hold open at once, per replica.
    max_watch_streams: int = -1
    #: Agent streams (AgentService.Connect) one user's agents may hold open at once, per replica.
    max_agent_streams: int = -1
    #: Seconds requests through a user's tunnels may be open in all per month (stream time).
    stream_seconds_per_month: int = -1


@dataclass(frozen=True, slots=True)
class TierInfo:
    """One tier with its limits and features."""

    tier: Tier
    display_name: str
    limits: TierLimits
    features: tuple[str, ...]
    self_service: bool


# --- users -----------------------------------------------------------------------------


class UserState(enum.StrEnum):
    """Life-cycle state of a user."""

    ACTIVE = "active"
    DELETED = "deleted"
    #: Stopped by an administrator until reactivated.
    SUSPENDED = "suspended"


class Theme(enum.StrEnum):
    """Colour theme preference."""

    SYSTEM = "system"
    LIGHT = "light"
    DARK = "dark"


@dataclass(frozen=True, slots=True)
class Notifications:
    """Notification choices."""

    email: bool = True
    security_alerts: bool = True
    product_updates: bool = False
    service_alerts: bool = True


@dataclass(frozen=True, slots=True)
class Preferences:
    """A user's preferences."""

    theme: Theme = Theme.SYSTEM
    language: str = "en"
    time_zone: str = ""
    notifications: Notifications = field(default_factory=Notifications)


@dataclass(frozen=True, slots=True)
class Profile:
    """The part of a user that the user edits: what UpdateUser's mask paths address."""

    display_name: str = ""
    preferences: Preferences = field(default_factory=Preferences)


@dataclass(frozen=True, slots=True)
class User:
    """A user account."""

    id: str
    email: str
    display_name: str
    role: Role
    tier: Tier
    state: UserState
    preferences: Preferences
    create_time: datetime
    update_time: datetime
    version: int = 1
    has_avatar: bool = False
    delete_time: datetime | None = None
    purge_time: datetime | None = None
    last_login_time: datetime | None = None

    @property
    def name(self) -> str:
        """Resource name ``users/{id}``."""
        return f"users/{self.id}"


@dataclass(frozen=True, slots=True)
class UserCredentials:
    """A user with their password hash, for sign-in only."""

    user: User
    password_hash: str | None


@dataclass(frozen=True, slots=True)
class Avatar:
    """An avatar image."""

    user_id: str
    content_type: str
    data: bytes
    update_time: datetime


# --- sessions, access tokens and API keys ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Session:
    """A sign-in session: one family of rotated refresh tokens."""

    id: str
    user_id: str
    create_time: datetime
    expire_time: datetime
    ip_address: str = ""
    user_agent: str = ""
    revoke_time: datetime | None = None
    revoke_reason: str = ""


@dataclass(frozen=True, slots=True)
class RefreshToken:
    """One refresh token of a session, stored only as a hash."""

    id: str
    session_id: str
    user_id: str
    token_hash: str
    create_time: datetime
    expire_time: datetime
    used_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An API key, stored only as a hash of its secret."""

    id: str
    user_id: str
    display_name: str
    prefix: str
    secret_hash: str
    scopes: tuple[str, ...]
    create_time: datetime
    expire_time: datetime | None = None
    revoke_time: datetime | None = None
    last_use_time: datetime | None = None
    replaced_by: str = ""
    #: An agent key's one tunnel ("" for any of the owner's).
    tunnel_id: str = ""

    @property
    def name(self) -> str:
        """Resource name ``users/{user}/apiKeys/{id}``."""
        return f"users/{self.user_id}/apiKeys/{self.id}"


@dataclass(frozen=True, slots=True)
class AccessClaims:
    """What a verified access token says."""

    subject: str
    session_id: str
    token_id: str
    issued_at: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A freshly signed access token and its claims."""

    token: str
    claims: AccessClaims


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """Where a call came from."""

    ip_address: str
    user_agent: str


@dataclass(frozen=True, slots=True)
class SessionTokens:
    """An access token and the refresh token that renews it."""

    access: IssuedToken
    refresh_token: str
    refresh_expire_time: datetime
    issue_time: datetime


@dataclass(frozen=True, slots=True)
class CreatedKey:
    """A new key with its one-time secret."""

    key: ApiKey
    secret: str


@dataclass(frozen=True, slots=True)
class KeyIdentity:
    """What a presented key resolves to."""

    key_id: str
    user_id: str
    scopes: frozenset[str]
    expire_time: float | None
    last_use_time: float | None
    tunnel_id: str = ""
