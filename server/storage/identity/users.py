"""Users and avatars."""

from __future__ import annotations

import builtins
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from server.domain.common.errors import Aborted, NotFound
from server.domain.common.listing import ListQuery
from server.domain.identity.model import (
    Avatar,
    Notifications,
    Preferences,
    Role,
    Theme,
    Tier,
    User,
    UserCredentials,
    UserState,
)
from server.storage.base import Repository
from server.storage.query import apply_list_query
from server.storage.tables import avatars, users

_c = users.c
USER_COLUMNS = {
    "email": _c.email,
    "display_name": _c.display_name,
    "tier": _c.tier,
    "role": _c.role,
    "state": _c.state,
    "create_time": _c.create_time,
    "update_time": _c.update_time,
    "last_login_time": _c.last_login_time,
}
_PUBLIC = [c for c in users.c if c.name != "password_hash"]
#: Built once: the hottest read (every GetUser) skips statement construction.
_GET_BY_ID = sa.select(*_PUBLIC).where(_c.id == sa.bindparam("user_id"))


def preferences_to_json(prefs: Preferences) -> dict[str, Any]:
    """Stored form of preferences."""
    n = prefs.notifications
    return {
        "theme": prefs.theme.value,
        "language": prefs.language,
        "time_zone": prefs.time_zone,
        "notifications": {
            "email": n.email,
            "security_alerts": n.security_alerts,
            "product_updates": n.product_updates,
            "service_alerts": n.service_alerts,
        },
    }


def preferences_from_json(data: dict[str, Any]) -> Preferences:
    """Preferences from their stored form; missing keys take defaults."""
    defaults = Preferences()
    notes = data.get("notifications") or {}
    return Preferences(
        theme=Theme(data.get("theme", defaults.theme.value)),
        language=str(data.get("language", defaults.language)),
        time_zone=str(data.get("time_zone", defaults.time_zone)),
        notifications=Notifications(
            **{k: bool(v) for k, v in notes.items() if k in Notifications.__dataclass_fields__}
        ),
    )


def _user(row: sa.RowMapping) -> User:
    return User(
        id=row["id"],
        email=row["email"],
        display_name=row["display_name"],
        role=Role(row["role"]),
        tier=Tier(row["tier"]),
        state=UserState(row["state"]),
        preferences=preferences_from_json(row["preferences"]),
        create_time=row["create_time"],
        update_time=row["update_time"],
        version=row["version"],
        has_avatar=row["has_avatar"],
        delete_time=row["delete_time"],
        purge_time=row["purge_time"],
        last_login_time=row["last_login_time"],
    )


def _columns(values: dict[str, Any]) -> dict[str, Any]:
    out = dict(values)
    if "preferences" in out:
        out["preferences"] = preferences_to_json(out["preferences"])
    for key in ("role", "tier", "state"):
        if key in out:
            out[key] = out[key].value
    return out


class SqlUserRepository(Repository):
    """Users in SQL."""

    async def get(self, user_id: str) -> User | None:
        row = await self._one(_GET_BY_ID, {"user_id": user_id})
        return None if row is None else _user(row)

    async def get_credentials(self, email_normalized: str) -> UserCredentials | None:
        row = await self._one(sa.select(users).where(_c.email == email_normalized))
        return None if row is None else UserCredentials(_user(row), row["password_hash"])

    async def add(self, user: User, password_hash: str | None) -> None:
        values = _columns(
            {
                "id": user.id,
                "email": user.email,
                "display_name": user.display_name,
                "password_hash": password_hash,
                "role": user.role,
                "tier": user.tier,
                "state": user.state,
                "preferences": user.preferences,
                "has_avatar": user.has_avatar,
                "version": user.version,
                "create_time": user.create_time,
                "update_time": user.update_time,
            }
        )
        await self._insert(users, values, "user", user.email)

    async def update(self, user_id: str, expected_version: int | None, **values: Any) -> User:
        stmt = (
            sa.update(users)
            .where(_c.id == user_id)
            .values(**_columns(values), version=_c.version + 1)
            .returning(*_PUBLIC)
        )
        if expected_version is not None:
            stmt = stmt.where(_c.version == expected_version)
        row = await self._one(stmt)
        if row is not None:
            return _user(row)
        if await self.get(user_id) is None:
            raise NotFound("user", f"users/{user_id}")
        raise Aborted("the user was changed concurrently; retry", reason="CONCURRENT_UPDATE")

    async def touch(self, user_id: str, **values: Any) -> None:
        await self._conn.execute(sa.update(users).where(_c.id == user_id).values(**values))

    async def set_password_hash(self, user_id: str, password_hash: str) -> None:
        await self.touch(user_id, password_hash=password_hash)

    async def list(self, query: ListQuery, *, include_deleted: bool) -> builtins.list[User]:
        stmt = sa.select(*_PUBLIC)
        if not include_deleted:
            stmt = stmt.where(_c.state != UserState.DELETED.value)
        stmt = apply_list_query(stmt, query, USER_COLUMNS, _c.id)
        return [_user(row) for row in await self._all(stmt)]

    async def delete(self, user_id: str) -> None:
        await self._conn.execute(sa.delete(users).where(_c.id == user_id))

    async def due_for_purge(self, now: datetime, limit: int) -> builtins.list[str]:
        stmt = (
            sa.select(_c.id)
            .where(_c.state == UserState.DELETED.value, _c.purge_time <= now)
            .order_by(_c.purge_time)
            .limit(limit)
        )
        return [row["id"] for row in await self._all(stmt)]


class SqlAvatarRepository(Repository):
    """Avatars in SQL."""

    async def get(self, user_id: str) -> Avatar | None:
        row = await self._one(sa.select(avatars).where(avatars.c.user_id == user_id))
        if row is None:
            return None
        return Avatar(row["user_id"], row["content_type"], row["data"], row["update_time"])

    async def put(self, avatar: Avatar) -> None:
        await self.delete(avatar.user_id)
        await self._conn.execute(
            avatars.insert().values(
                user_id=avatar.user_id,
                content_type=avatar.content_type,
                data=avatar.data,
                update_time=avatar.update_time,
            )
        )

    async def delete(self, user_id: str) -> bool:
        result = await self._conn.execute(sa.delete(avatars).where(avatars.c.user_id == user_id))
        return bool(result.rowcount)
