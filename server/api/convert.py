"""Conversions between protobuf messages and domain records, in both directions.

Inbound conversions validate: an enum number the contract does not define, or a value
out of range, is an ``INVALID_ARGUMENT`` naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message
from tunnelplane.v1 import auth_pb2, common_pb2, users_pb2

from server.domain.audit.model import AuditEntry
from server.domain.common.errors import InvalidArgument
from server.domain.identity.model import (
    ApiKey,
    Notifications,
    Preferences,
    Profile,
    Role,
    Theme,
    Tier,
    TierInfo,
    User,
    UserState,
)
from server.domain.identity.rules import etag_of, state_of
from server.domain.limits.model import Usage

K = TypeVar("K")
V = TypeVar("V")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: The range of ``google.protobuf.Duration``: about 10,000 years either way.
MAX_DURATION_SECONDS = 315_576_000_000

ROLES: Mapping[int, Role] = {
    common_pb2.ROLE_USER: Role.USER,
    common_pb2.ROLE_SUPER_ADMIN: Role.SUPER_ADMIN,
    common_pb2.ROLE_SUPPORT_ADMIN: Role.SUPPORT_ADMIN,
    common_pb2.ROLE_FINANCE_ADMIN: Role.FINANCE_ADMIN,
    common_pb2.ROLE_SERVICE: Role.SERVICE,
    common_pb2.ROLE_AGENT: Role.AGENT,
}
TIERS: Mapping[int, Tier] = {
    common_pb2.TIER_FREE: Tier.FREE,
    common_pb2.TIER_PREMIUM: Tier.PREMIUM,
    common_pb2.TIER_ENTERPRISE: Tier.ENTERPRISE,
}
THEMES: Mapping[int, Theme] = {
    users_pb2.Preferences.THEME_UNSPECIFIED: Theme.SYSTEM,
    users_pb2.Preferences.THEME_SYSTEM: Theme.SYSTEM,
    users_pb2.Preferences.THEME_LIGHT: Theme.LIGHT,
    users_pb2.Preferences.THEME_DARK: Theme.DARK,
}
USER_STATES: Mapping[UserState, int] = {
    UserState.ACTIVE: users_pb2.User.STATE_ACTIVE,
    UserState.DELETED: users_pb2.User.STATE_DELETED,
    UserState.SUSPENDED: users_pb2.User.STATE_SUSPENDED,
}
COOKIE_DELIVERY: Mapping[int, bool] = {
    auth_pb2.REFRESH_TOKEN_DELIVERY_UNSPECIFIED: False,
    auth_pb2.REFRESH_TOKEN_DELIVERY_BODY: False,
    auth_pb2.REFRESH_TOKEN_DELIVERY_COOKIE: True,
}
KEY_STATES: Mapping[str, int] = {
    "active": auth_pb2.ApiKey.STATE_ACTIVE,
    "expired": auth_pb2.ApiKey.STATE_EXPIRED,
    "revoked": auth_pb2.ApiKey.STATE_REVOKED,
}


def _reverse(mapping: Mapping[int, V]) -> dict[V, int]:
    return {value: key for key, value in mapping.items()}


_ROLE_NUMBERS = _reverse(ROLES)
_TIER_NUMBERS = _reverse(TIERS)
_THEME_NUMBERS = {Theme.SYSTEM: 1, Theme.LIGHT: 2, Theme.DARK: 3}


def enum_in(mapping: Mapping[int, V], number: int, field: str) -> V:
    """The domain value of a required enum field."""
    value = mapping.get(number)
    if value is None:
        raise InvalidArgument.single(field, "must be set to a defined value", "REQUIRED")
    return value


def cookie_delivery(number: int) -> bool:
    """Whether ``refresh_token_delivery`` asks for the refresh token in a cookie."""
    cookie = COOKIE_DELIVERY.get(number)
    if cookie is None:
        raise InvalidArgument.single("refresh_token_delivery", "is not a defined delivery")
    return cookie


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A protobuf Timestamp, or ``None`` to leave the field unset."""
    if value is None:
        return None
    # Arithmetic on the datetime instead of Timestamp.FromDatetime: the same result, a
    # fraction of the cost on the hot path (every User has several timestamps).
    delta = value - _EPOCH
    return timestamp_pb2.Timestamp(
        seconds=delta.days * 86400 + delta.seconds, nanos=delta.microseconds * 1000
    )


def from_timestamp(ts: timestamp_pb2.Timestamp, field: str) -> datetime:
    """A datetime from a Timestamp, refusing values outside the valid range."""
    if not 0 <= ts.nanos < 1_000_000_000 or not -62135596800 <= ts.seconds <= 253402300799:
        raise InvalidArgument.single(field, "is not a valid timestamp")
    return ts.ToDatetime(tzinfo=UTC)


def from_duration(value: duration_pb2.Duration, field: str) -> timedelta:
    """A timedelta from a Duration, refusing malformed values."""
    if (
        abs(value.seconds) > MAX_DURATION_SECONDS
        or abs(value.nanos) >= 1_000_000_000
        or (value.seconds > 0 > value.nanos)
        or (value.seconds < 0 < value.nanos)
    ):
        raise InvalidArgument.single(field, "is not a valid duration")
    return value.ToTimedelta()


def user(u: User) -> users_pb2.User:
    """The API form of a user."""
    n = u.preferences.notifications
    return users_pb2.User(
        name=u.name,
        email=u.email,
        display_name=u.display_name,
        role=_ROLE_NUMBERS[u.role],  # type: ignore[arg-type]
        tier=_TIER_NUMBERS[u.tier],  # type: ignore[arg-type]
        state=USER_STATES[u.state],  # type: ignore[arg-type]
        preferences=users_pb2.Preferences(
            theme=_THEME_NUMBERS[u.preferences.theme],  # type: ignore[arg-type]
            language=u.preferences.language,
            time_zone=u.preferences.time_zone,
            notifications=users_pb2.NotificationPreferences(
                email=n.email,
                security_alerts=n.security_alerts,
                product_updates=n.product_updates,
                service_alerts=n.service_alerts,
            ),
        ),
        has_avatar=u.has_avatar,
        create_time=timestamp(u.create_time),
        update_time=timestamp(u.update_time),
        delete_time=timestamp(u.delete_time),
        purge_time=timestamp(u.purge_time),
        last_login_time=timestamp(u.last_login_time),
        etag=etag_of(u),
    )


def profile(message: users_pb2.User) -> Profile:
    """The editable part of a user as sent in an update."""
    p = message.preferences
    theme = THEMES.get(p.theme)
    if theme is None:
        raise InvalidArgument.single("user.preferences.theme", "is not a defined theme")
    n = p.notifications
    return Profile(
        display_name=message.display_name,
        preferences=Preferences(
            theme=theme,
            language=p.language,
            time_zone=p.time_zone,
            notifications=Notifications(
                email=n.email,
                security_alerts=n.security_alerts,
                product_updates=n.product_updates,
                service_alerts=n.service_alerts,
            ),
        ),
    )


#: Fields that say which resource and which version an update is for, never what changes:
#: a mask that names them (a client's; the gateway leaves them out of the masks it infers
#: from a PATCH body, with every output-only field) has them skipped.
SELECTORS = frozenset({"name", "etag"})


def mask_paths(mask: FieldMask, message: Message, updatable: frozenset[str]) -> tuple[str, ...]:
    """The paths an update names: the mask's, or (no mask) every populated updatable field."""
    if mask.paths:
        return tuple(p for p in mask.paths if p not in SELECTORS)
    return tuple(p for p in populated_paths(message) if p in updatable)


def populated_paths(message: Message, prefix: str = "") -> list[str]:
    """Dotted paths of every populated leaf field (a set but empty message counts as one)."""
    paths: list[str] = []
    for field, value in message.ListFields():
        path = prefix + field.name
        singular = not field.is_repeated
        composite = field.message_type is not None and not field.message_type.full_name.startswith(
            "google.protobuf."
        )  # a Duration or Timestamp is one value, not a message of fields
        if singular and composite and isinstance(value, Message):
            nested = populated_paths(value, path + ".")
            paths.extend(nested or [path])
        else:
            paths.append(path)
    return paths


def tier_details(info: TierInfo) -> users_pb2.TierDetails:
    """The API form of a tier."""
    limits = info.limits
    return users_pb2.TierDetails(
        name=f"tiers/{info.tier.value}",
        tier=_TIER_NUMBERS[info.tier],  # type: ignore[arg-type]
        display_name=info.display_name,
        requests_per_minute=limits.requests_per_minute,
        max_tunnels=limits.max_tunnels,
        max_concurrent_connections=limits.max_concurrent_connections,
        requests_per_month=limits.requests_per_month,
        transfer_bytes_per_month=limits.transfer_bytes_per_month,
        features=list(info.features),
        self_service=info.self_service,
        burst=limits.burst,
        max_watch_streams=limits.max_watch_streams,
        max_agent_streams=limits.max_agent_streams,
        stream_seconds_per_month=limits.stream_seconds_per_month,
    )


def usage(value: Usage) -> users_pb2.Usage:
    """The API form of a user's quota usage."""
    return users_pb2.Usage(
        name=f"users/{value.user_id}/usage",
        tier=_TIER_NUMBERS[value.tier],  # type: ignore[arg-type]
        period_start=timestamp(value.period_start),
        period_end=timestamp(value.period_end),
        quotas=[
            users_pb2.QuotaUsage(metric=q.metric, used=q.used, limit=q.limit) for q in value.quotas
        ],
    )


def api_key(key: ApiKey, now: datetime) -> auth_pb2.ApiKey:
    """The API form of a key (never its secret)."""
    return auth_pb2.ApiKey(
        name=key.name,
        display_name=key.display_name,
        prefix=key.prefix,
        scopes=list(key.scopes),
        state=KEY_STATES[state_of(key, now)],  # type: ignore[arg-type]
        create_time=timestamp(key.create_time),
        expire_time=timestamp(key.expire_time),
        revoke_time=timestamp(key.revoke_time),
        last_use_time=timestamp(key.last_use_time),
        replaced_by=f"users/{key.user_id}/apiKeys/{key.replaced_by}" if key.replaced_by else "",
        tunnel=f"users/{key.user_id}/tunnels/{key.tunnel_id}" if key.tunnel_id else "",
    )


def acted_by(entry: AuditEntry) -> tuple[str, str]:
    """An audit entry's actor and API key as resource names ("" when none)."""
    user, key = entry.actor_user_id, entry.api_key_id
    return (f"users/{user}" if user else "", f"users/{user}/apiKeys/{key}" if key else "")


def activity(entry: AuditEntry, user_id: str) -> users_pb2.ActivityEntry:
    """The API form of an audit entry in a user's activity log."""
    actor, api_key = acted_by(entry)
    return users_pb2.ActivityEntry(
        name=f"users/{user_id}/activity/{entry.id}",
        action=entry.action,
        method=entry.method,
        outcome=entry.outcome,
        reason=entry.reason,
        actor=actor,
        api_key=api_key,
        resource=entry.resource,
        ip_address=entry.ip_address,
        user_agent=entry.user_agent,
        request_id=entry.request_id,
        create_time=timestamp(entry.time),
    )
