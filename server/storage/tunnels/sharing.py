"""Tunnel shares and share links."""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.sql.base import ReadOnlyColumnCollection

from server.domain.common.listing import ListQuery
from server.domain.identity.model import ShareRole
from server.domain.tunnels.model import Share, SharedTunnel, ShareLink
from server.storage.base import Repository
from server.storage.query import apply_list_query
from server.storage.tables import share_links, tunnel_shares, tunnels
from server.storage.tunnels.tunnels import SqlTunnelRepository

_s = tunnel_shares.c
_l = share_links.c
_SHARE_COLUMNS = [*tunnel_shares.c, tunnels.c.user_id.label("owner_id")]
_LINK_COLUMNS = [*share_links.c, tunnels.c.user_id.label("owner_id")]


def _share(row: sa.RowMapping) -> Share:
    return Share(
        row["tunnel_id"],
        row["owner_id"],
        row["grantee_id"],
        ShareRole(row["role"]),
        row["expire_time"],
        row["create_time"],
        row["creator_id"],
        row["parent_grantee_id"] or "",
    )


def _link(row: sa.RowMapping) -> ShareLink:
    ttl = row["share_ttl"]
    return ShareLink(
        id=row["id"],
        tunnel_id=row["tunnel_id"],
        owner_id=row["owner_id"],
        role=ShareRole(row["role"]),
        max_uses=row["max_uses"],
        use_count=row["use_count"],
        expire_time=row["expire_time"],
        share_ttl=None if ttl is None else timedelta(seconds=ttl),
        create_time=row["create_time"],
        revoke_time=row["revoke_time"],
        # Links made before they recorded their creator were all made by the owner.
        creator_id=row["creator_id"] or row["owner_id"],
        parent_grantee_id=row["parent_grantee_id"] or "",
    )


def _capped(column: sa.Column[Any], cap: object) -> sa.ColumnElement[Any]:
    """``column`` lowered to ``cap`` where it is above it (NULL, never, counts as above)."""
    limit = sa.literal(cap, column.type)
    return sa.case((sa.or_(column.is_(None), column > limit), limit), else_=column)


def _narrowed(
    columns: ReadOnlyColumnCollection[str, sa.Column[Any]],
    role: ShareRole,
    expire_time: datetime | None,
) -> dict[str, sa.ColumnElement[Any]]:
    """The values that cap a share's or a link's ``role`` and ``expire_time`` columns."""
    values = {"role": _capped(columns.role, int(role))}
    if expire_time is not None:
        values["expire_time"] = _capped(columns.expire_time, expire_time)
    return values


class SqlShareRepository(Repository):
    """Shares and links in SQL."""

    def _shares(self) -> sa.Select[tuple[object, ...]]:
        return sa.select(*_SHARE_COLUMNS).join(tunnels, tunnels.c.id == _s.tunnel_id)

    def _links(self) -> sa.Select[tuple[object, ...]]:
        return sa.select(*_LINK_COLUMNS).join(tunnels, tunnels.c.id == _l.tunnel_id)

    async def get(self, tunnel_id: str, grantee_id: str) -> Share | None:
        row = await self._one(
            self._shares().where(_s.tunnel_id == tunnel_id, _s.grantee_id == grantee_id)
        )
        return None if row is None else _share(row)

    async def put(self, share: Share) -> None:
        """Insert or replace the grantee's share of the tunnel."""
        await self.delete(share.tunnel_id, share.grantee_id)
        await self._conn.execute(
            tunnel_shares.insert().values(
                tunnel_id=share.tunnel_id,
                grantee_id=share.grantee_id,
                role=int(share.role),
                expire_time=share.expire_time,
                create_time=share.create_time,
                creator_id=share.creator_id,
                parent_grantee_id=share.parent_grantee_id or None,
            )
        )

    async def delete(self, tunnel_id: str, grantee_id: str) -> None:
        await self._conn.execute(
            sa.delete(tunnel_shares).where(_s.tunnel_id == tunnel_id, _s.grantee_id == grantee_id)
        )

    async def list(self, tunnel_id: str, query: ListQuery) -> builtins.list[Share]:
        stmt = self._shares().where(_s.tunnel_id == tunnel_id)
        stmt = apply_list_query(stmt, query, {"create_time": _s.create_time}, _s.grantee_id)
        return [_share(row) for row in await self._all(stmt)]

    async def shared_with(
        self, grantee_id: str, now: datetime, query: ListQuery
    ) -> builtins.list[SharedTunnel]:
        stmt = self._shares().where(
            _s.grantee_id == grantee_id, sa.or_(_s.expire_time.is_(None), _s.expire_time > now)
        )
        stmt = apply_list_query(stmt, query, {"create_time": _s.create_time}, _s.tunnel_id)
        shares = [_share(row) for row in await self._all(stmt)]
        found = {
            t.id: t
            for t in await SqlTunnelRepository(self._conn).by_ids([s.tunnel_id for s in shares])
        }
        return [
            SharedTunnel(
                found[s.tunnel_id], s.role, s.expire_time, s.create_time, s.parent_grantee_id
            )
            for s in shares
            if s.tunnel_id in found
        ]

    async def add_link(self, link: ShareLink, token_hash: str) -> None:
        ttl = link.share_ttl
        await self._conn.execute(
            share_links.insert().values(
                id=link.id,
                tunnel_id=link.tunnel_id,
                token_hash=token_hash,
                role=int(link.role),
                max_uses=link.max_uses,
                use_count=link.use_count,
                expire_time=link.expire_time,
                share_ttl=None if ttl is None else int(ttl.total_seconds()),
                create_time=link.create_time,
                creator_id=link.creator_id or None,
                parent_grantee_id=link.parent_grantee_id or None,
            )
        )

    async def find_link(self, token_hash: str) -> ShareLink | None:
        row = await self._one(self._links().where(_l.token_hash == token_hash))
        return None if row is None else _link(row)

    async def spend_link(self, link_id: str, now: datetime) -> bool:
        """Use the link once if it still has a use left (one statement: no double spend)."""
        stmt = (
            sa.update(share_links)
            .where(
                _l.id == link_id,
                _l.use_count < _l.max_uses,
                _l.revoke_time.is_(None),
                _l.expire_time > now,
            )
            .values(use_count=_l.use_count + 1)
        )
        return bool((await self._conn.execute(stmt)).rowcount)

    async def list_links(self, tunnel_id: str, query: ListQuery) -> builtins.list[ShareLink]:
        stmt = self._links().where(_l.tunnel_id == tunnel_id)
        stmt = apply_list_query(stmt, query, {"create_time": _l.create_time}, _l.id)
        return [_link(row) for row in await self._all(stmt)]

    async def revoke_link(self, tunnel_id: str, link_id: str, now: datetime) -> ShareLink | None:
        await self._conn.execute(
            sa.update(share_links)
            .where(_l.id == link_id, _l.tunnel_id == tunnel_id, _l.revoke_time.is_(None))
            .values(revoke_time=now)
        )
        row = await self._one(self._links().where(_l.id == link_id, _l.tunnel_id == tunnel_id))
        return None if row is None else _link(row)

    async def get_link(self, tunnel_id: str, link_id: str) -> ShareLink | None:
        row = await self._one(self._links().where(_l.id == link_id, _l.tunnel_id == tunnel_id))
        return None if row is None else _link(row)

    async def lock_tunnel(self, tunnel_id: str) -> None:
        """Serialise changes to one tunnel's shares (no-op on SQLite's one writer)."""
        await self._conn.execute(
            sa.select(tunnels.c.id).where(tunnels.c.id == tunnel_id).with_for_update()
        )

    async def children(self, tunnel_id: str, parent_ids: Sequence[str]) -> builtins.list[str]:
        """Grantees of the shares granted through any of ``parent_ids``' shares."""
        stmt = sa.select(_s.grantee_id).where(
            _s.tunnel_id == tunnel_id, _s.parent_grantee_id.in_(list(parent_ids))
        )
        return [row["grantee_id"] for row in await self._all(stmt)]

    async def delete_many(self, tunnel_id: str, grantee_ids: Sequence[str]) -> None:
        await self._conn.execute(
            sa.delete(tunnel_shares).where(
                _s.tunnel_id == tunnel_id, _s.grantee_id.in_(list(grantee_ids))
            )
        )

    async def narrow(
        self,
        tunnel_id: str,
        grantee_ids: Sequence[str],
        role: ShareRole,
        expire_time: datetime | None,
    ) -> None:
        """Lower these shares' role and expiry to at most ``role`` and ``expire_time``."""
        if not grantee_ids:
            return
        await self._conn.execute(
            sa.update(tunnel_shares)
            .where(_s.tunnel_id == tunnel_id, _s.grantee_id.in_(list(grantee_ids)))
            .values(_narrowed(_s, role, expire_time))
        )

    async def narrow_links(
        self,
        tunnel_id: str,
        parent_ids: Sequence[str],
        role: ShareRole,
        expire_time: datetime | None,
    ) -> None:
        """Lower the role and expiry of the links made through these shares."""
        await self._conn.execute(
            sa.update(share_links)
            .where(_l.tunnel_id == tunnel_id, _l.parent_grantee_id.in_(list(parent_ids)))
            .values(_narrowed(_l, role, expire_time))
        )

    async def revoke_links_through(
        self, tunnel_id: str, parent_ids: Sequence[str], now: datetime
    ) -> int:
        """Revoke the live links made through these shares; how many were."""
        result = await self._conn.execute(
            sa.update(share_links)
            .where(
                _l.tunnel_id == tunnel_id,
                _l.parent_grantee_id.in_(list(parent_ids)),
                _l.revoke_time.is_(None),
            )
            .values(revoke_time=now)
        )
        return int(result.rowcount)
