"""API keys in SQL (only hashes of their secrets)."""

from __future__ import annotations

import builtins
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from server.domain.common.listing import ListQuery
from server.domain.identity.model import ApiKey
from server.storage.base import Repository
from server.storage.query import apply_list_query
from server.storage.tables import api_keys, refresh_tokens, sessions

_s, _t, _k = sessions.c, refresh_tokens.c, api_keys.c


def _key(row: sa.RowMapping) -> ApiKey:
    return ApiKey(
        id=row["id"],
        user_id=row["user_id"],
        display_name=row["display_name"],
        prefix=row["prefix"],
        secret_hash=row["secret_hash"],
        scopes=tuple(row["scopes"]),
        create_time=row["create_time"],
        expire_time=row["expire_time"],
        revoke_time=row["revoke_time"],
        last_use_time=row["last_use_time"],
        replaced_by=row["replaced_by"],
        tunnel_id=row["tunnel_id"] or "",
    )


class SqlApiKeyRepository(Repository):
    """API keys in SQL."""

    async def add(self, key: ApiKey) -> None:
        await self._insert(
            api_keys,
            {
                "id": key.id,
                "user_id": key.user_id,
                "display_name": key.display_name,
                "prefix": key.prefix,
                "secret_hash": key.secret_hash,
                "scopes": list(key.scopes),
                "create_time": key.create_time,
                "expire_time": key.expire_time,
                "revoke_time": key.revoke_time,
                "replaced_by": key.replaced_by,
                "tunnel_id": key.tunnel_id or None,
            },
            "api key",
            key.name,
        )

    async def get(self, user_id: str, key_id: str) -> ApiKey | None:
        row = await self._one(sa.select(api_keys).where(_k.id == key_id, _k.user_id == user_id))
        return None if row is None else _key(row)

    async def find_by_hash(self, secret_hash: str) -> ApiKey | None:
        row = await self._one(sa.select(api_keys).where(_k.secret_hash == secret_hash))
        return None if row is None else _key(row)

    async def list(
        self, user_id: str, query: ListQuery, *, active_at: datetime | None
    ) -> builtins.list[ApiKey]:
        stmt = sa.select(api_keys).where(_k.user_id == user_id)
        if active_at is not None:
            stmt = stmt.where(
                _k.revoke_time.is_(None),
                sa.or_(_k.expire_time.is_(None), _k.expire_time > active_at),
            )
        stmt = apply_list_query(stmt, query, {"create_time": _k.create_time}, _k.id)
        return [_key(row) for row in await self._all(stmt)]

    async def update(self, key_id: str, **values: Any) -> None:
        await self._conn.execute(sa.update(api_keys).where(_k.id == key_id).values(**values))
