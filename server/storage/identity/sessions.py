"""Sessions and their refresh tokens in SQL."""

from __future__ import annotations

import builtins
from datetime import datetime

import sqlalchemy as sa

from server.domain.identity.model import RefreshToken, Session
from server.storage.base import Repository
from server.storage.tables import api_keys, refresh_tokens, sessions

_s, _t, _k = sessions.c, refresh_tokens.c, api_keys.c


def _session(row: sa.RowMapping) -> Session:
    return Session(
        id=row["id"],
        user_id=row["user_id"],
        create_time=row["create_time"],
        expire_time=row["expire_time"],
        ip_address=row["ip_address"],
        user_agent=row["user_agent"],
        revoke_time=row["revoke_time"],
        revoke_reason=row["revoke_reason"],
    )


def _token(row: sa.RowMapping) -> RefreshToken:
    return RefreshToken(
        id=row["id"],
        session_id=row["session_id"],
        user_id=row["user_id"],
        token_hash=row["token_hash"],
        create_time=row["create_time"],
        expire_time=row["expire_time"],
        used_time=row["used_time"],
    )


class SqlSessionRepository(Repository):
    """Sessions and refresh tokens in SQL."""

    async def add_session(self, session: Session) -> None:
        await self._conn.execute(
            sessions.insert().values(
                id=session.id,
                user_id=session.user_id,
                create_time=session.create_time,
                expire_time=session.expire_time,
                ip_address=session.ip_address,
                user_agent=session.user_agent,
            )
        )

    async def get_session(self, session_id: str) -> Session | None:
        row = await self._one(sa.select(sessions).where(_s.id == session_id))
        return None if row is None else _session(row)

    async def add_token(self, token: RefreshToken) -> None:
        await self._conn.execute(
            refresh_tokens.insert().values(
                id=token.id,
                session_id=token.session_id,
                user_id=token.user_id,
                token_hash=token.token_hash,
                create_time=token.create_time,
                expire_time=token.expire_time,
            )
        )

    async def spend_token(self, token_hash: str, now: datetime) -> RefreshToken | None:
        """Mark a token used if, and only if, it is unused, unexpired and its session is live.

        One conditional UPDATE: of two concurrent spends exactly one matches the row.
        """
        live_session = sa.select(_s.id).where(
            _s.id == _t.session_id, _s.revoke_time.is_(None), _s.expire_time > now
        )
        stmt = (
            sa.update(refresh_tokens)
            .where(
                _t.token_hash == token_hash,
                _t.used_time.is_(None),
                _t.expire_time > now,
                sa.exists(live_session),
            )
            .values(used_time=now)
            .returning(*refresh_tokens.c)
        )
        row = await self._one(stmt)
        return None if row is None else _token(row)

    async def find_token(self, token_hash: str) -> RefreshToken | None:
        row = await self._one(sa.select(refresh_tokens).where(_t.token_hash == token_hash))
        return None if row is None else _token(row)

    async def revoke_session(self, session_id: str, now: datetime, reason: str) -> bool:
        result = await self._conn.execute(
            sa.update(sessions)
            .where(_s.id == session_id, _s.revoke_time.is_(None))
            .values(revoke_time=now, revoke_reason=reason)
        )
        return bool(result.rowcount)

    async def revoke_user_sessions(
        self, user_id: str, now: datetime, reason: str
    ) -> builtins.list[str]:
        rows = await self._all(
            sa.update(sessions)
            .where(_s.user_id == user_id, _s.revoke_time.is_(None))
            .values(revoke_time=now, revoke_reason=reason)
            .returning(_s.id)
        )
        return [row["id"] for row in rows]
