"""The domain's records: plain frozen dataclasses, free of any transport or storage type."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from server.domain.principal import Role, Tier


class UserState(enum.StrEnum):
    """Life-cycle state of a user."""

    ACTIVE = "active"
    DELETED = "deleted"


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
