"""Sharing tunnels: shares to named users, and share links anyone signed in may accept.

The owner and administrators grant freely; a holder of an ``admin`` share grants only
within their own share (see :mod:`server.domain.tunnels.share_chain`).
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta
from typing import Any

from server.domain.audit import service as audit
from server.domain.audit.model import AuditTrail
from server.domain.common.clock import Clock
from server.domain.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PreconditionViolation,
    Violations,
)
from server.domain.common.ids import new_id
from server.domain.common.listing import Lister, ListQuery, ListSpec, OrderKey, Page
from server.domain.identity.model import ShareRole
from server.domain.tunnels import share_chain as chain
from server.domain.tunnels.model import Share, SharedTunnel, ShareLink, Tunnel, share_name
from server.domain.unit_of_work import UnitOfWork, UnitOfWorkFactory

LINK_PREFIX = "tpl_"
DEFAULT_LINK_TTL = timedelta(days=7)
MAX_LINK_TTL = timedelta(days=90)
MAX_LINK_USES = 1000
MAX_SHARE_TTL = timedelta(days=3650)

SHARE_LIST_SPEC = ListSpec(
    filter_fields={},
    order_fields=frozenset({"create_time"}),
    default_order=(OrderKey("create_time"),),
)


def token_hash(token: str) -> str:
    """How a link token is stored."""
    return hashlib.sha256(token.encode()).hexdigest()


class ShareService:
    """Shares and share links, after authorization has allowed the call.

    ``through_share`` says that only a share of the tunnel let the caller in (they are
    neither its owner nor an administrator): then they grant within that share only.
    Every change to a tunnel's shares holds the tunnel's row lock, so that a grant through
    a share and the revocation of that share cannot interleave.
    """

    def __init__(self, uow: UnitOfWorkFactory, lister: Lister, clock: Clock) -> None:
        self._uow = uow
        self._lister = lister
        self._clock = clock

    async def share_role(self, resource: str, user_id: str) -> ShareRole:
        """The caller's share of the tunnel ``resource`` names (or lives under), as it counts
        now: capped by the shares it derives from, NONE once any of them has ended."""
        parts = resource.split("/")
        if len(parts) < 4 or parts[0] != "users" or parts[2] != "tunnels":
            return ShareRole.NONE
        async with self._uow(readonly=True) as uow:
            held = await chain.held_share(uow.shares, parts[3], user_id, self._clock.now())
        if held is None or held.share.owner_id != parts[1]:
            return ShareRole.NONE
        return held.role

    async def grant(
        self,
        tunnel: Tunnel,
        grantee_id: str,
        role: ShareRole,
        expire_time: datetime | None,
        *,
        creator_id: str,
        through_share: bool = False,
        trail: AuditTrail | None = None,
    ) -> Share:
        """Share ``tunnel`` with ``grantee_id`` (replacing an earlier share)."""
        now = self._clock.now()
        violations = Violations()
        if role is ShareRole.NONE:
            violations.add("share.role", "is required")
        _check_expiry(expire_time, now, "share.expire_time", MAX_SHARE_TTL, violations)
        violations.raise_if_any()
        if grantee_id == tunnel.user_id:
            raise InvalidArgument.single("share.grantee", "the owner cannot share with themselves")
        if through_share and grantee_id == creator_id:
            raise PermissionDenied("you cannot change your own share", reason="OWN_SHARE")
        async with self._uow() as uow:
            await uow.shares.lock_tunnel(tunnel.id)
            await _require_user(uow, grantee_id)
            parent = ""
            if through_share:
                held = await _held(uow, tunnel.id, creator_id, now)
                chain.check_role(held, role, "share.role", violations)
                chain.check_expiry(held, expire_time, "share.expire_time", violations)
                violations.raise_if_any()
                current = await chain.held_share(uow.shares, tunnel.id, grantee_id, now)
                if current is not None and creator_id not in current.chain[1:]:
                    raise chain.not_grantor()
                parent = creator_id
            share = Share(
                tunnel.id, tunnel.user_id, grantee_id, role, expire_time, now, creator_id, parent
            )
            await uow.shares.put(share)
            await chain.narrow_below(uow.shares, share)
            await _record(
                uow,
                trail,
                now,
                share.name,
                tunnel,
                parent,
                grantee=f"users/{grantee_id}",
                role=role.name,
            )
        return share

    async def list(self, tunnel: Tunnel, *, page_size: int, page_token: str) -> Page[Share]:
        """The tunnel's shares, oldest first."""
        query = self._query(page_size, page_token, f"shares={tunnel.id}")
        async with self._uow(lag_tolerant=True) as uow:
            rows = await uow.shares.list(tunnel.id, query)
        return self._lister.page(query, rows, lambda s: (s.create_time, s.grantee_id))

    def _query(self, page_size: int, page_token: str, scope: str) -> ListQuery:
        """A page of shares or links: oldest first, no filter."""
        return self._lister.query(
            SHARE_LIST_SPEC,
            page_size=page_size,
            page_token=page_token,
            filter="",
            order_by="",
            scope=scope,
        )

    async def revoke(
        self,
        tunnel: Tunnel,
        grantee_id: str,
        *,
        by: str = "",
        through_share: bool = False,
        trail: AuditTrail | None = None,
    ) -> Share:
        """Remove a share at once, with every share granted through it (at any depth) and
        the links their holders made. A share holder may revoke only their own share or
        one granted through it."""
        async with self._uow() as uow:
            await uow.shares.lock_tunnel(tunnel.id)
            share = await uow.shares.get(tunnel.id, grantee_id)
            if share is None:
                raise NotFound("share", f"{tunnel.name}/shares/{grantee_id}")
            if through_share and by not in await chain.lineage(uow.shares, tunnel.id, grantee_id):
                raise chain.not_grantor()
            holders = [grantee_id, *await chain.descendants(uow.shares, tunnel.id, grantee_id)]
            await uow.shares.delete_many(tunnel.id, holders)
            now = self._clock.now()
            links = await uow.shares.revoke_links_through(tunnel.id, holders, now)
            await _record(
                uow,
                trail,
                now,
                share.name,
                tunnel,
                by if through_share else "",
                shares_revoked=len(holders),
                links_revoked=links,
            )
        return share

    async def create_link(
        self,
        tunnel: Tunnel,
        role: ShareRole,
        max_uses: int,
        expire_time: datetime | None,
        share_ttl: timedelta | None,
        *,
        creator_id: str = "",
        through_share: bool = False,
        trail: AuditTrail | None = None,
    ) -> tuple[ShareLink, str]:
        """A new link and its token (shown once)."""
        now = self._clock.now()
        violations = Violations()
        if role is ShareRole.NONE:
            violations.add("share_link.role", "is required")
        if not 1 <= max_uses <= MAX_LINK_USES:
            violations.add("share_link.max_uses", f"must be between 1 and {MAX_LINK_USES}")
        _check_expiry(expire_time, now, "share_link.expire_time", MAX_LINK_TTL, violations)
        if share_ttl is not None and not timedelta(minutes=1) <= share_ttl <= MAX_SHARE_TTL:
            violations.add("share_link.share_ttl", "must be between 1 minute and 10 years")
        violations.raise_if_any()
        token = LINK_PREFIX + secrets.token_urlsafe(24)
        expire = expire_time or now + DEFAULT_LINK_TTL
        async with self._uow() as uow:
            await uow.shares.lock_tunnel(tunnel.id)
            parent = ""
            if through_share:
                held = await _held(uow, tunnel.id, creator_id, now)
                chain.check_role(held, role, "share_link.role", violations)
                if expire_time is not None:  # unset: the default, capped below
                    chain.check_expiry(held, expire_time, "share_link.expire_time", violations)
                chain.check_ttl(held, share_ttl, now, "share_link.share_ttl", violations)
                violations.raise_if_any()
                expire = chain.earliest(expire, held.expire_time) or expire
                parent = creator_id
            link = ShareLink(
                new_id("lnk", now.timestamp()),
                tunnel.id,
                tunnel.user_id,
                role,
                max_uses,
                0,
                expire,
                share_ttl,
                now,
                creator_id=creator_id or tunnel.user_id,
                parent_grantee_id=parent,
            )
            await uow.shares.add_link(link, token_hash(token))
            await _record(
                uow, trail, now, link.name, tunnel, parent, role=role.name, max_uses=max_uses
            )
        return link, token

    async def list_links(
        self, tunnel: Tunnel, *, page_size: int, page_token: str
    ) -> Page[ShareLink]:
        """The tunnel's links, oldest first."""
        query = self._query(page_size, page_token, f"links={tunnel.id}")
        async with self._uow(lag_tolerant=True) as uow:
            rows = await uow.shares.list_links(tunnel.id, query)
        return self._lister.page(query, rows, lambda link: (link.create_time, link.id))

    async def revoke_link(
        self,
        tunnel: Tunnel,
        link_id: str,
        *,
        by: str = "",
        through_share: bool = False,
        trail: AuditTrail | None = None,
    ) -> ShareLink:
        """Stop a link from being accepted (shares made through it stay). A share holder may
        revoke only links made through their share or one granted through it."""
        async with self._uow() as uow:
            found = await uow.shares.get_link(tunnel.id, link_id)
            if found is None:
                raise NotFound("share link", f"{tunnel.name}/shareLinks/{link_id}")
            if through_share and (
                not found.parent_grantee_id
                or by not in await chain.lineage(uow.shares, tunnel.id, found.parent_grantee_id)
            ):
                raise chain.not_grantor()
            now = self._clock.now()
            link = await uow.shares.revoke_link(tunnel.id, link_id, now)
            assert link is not None
            await _record(uow, trail, now, link.name, tunnel, by if through_share else "")
        return link

    async def accept(self, token: str, user_id: str, trail: AuditTrail | None = None) -> Share:
        """Spend one use of a link on the caller's share, unless the caller's share is
        already at least as good (then it stays, and the link is not spent)."""
        if not token.startswith(LINK_PREFIX) or len(token) > 100:
            raise InvalidArgument.single("token", "is not a share link token")
        now = self._clock.now()
        async with self._uow() as uow:
            link = await uow.shares.find_link(token_hash(token))
            if link is None or not link.active(now):
                raise _link_unusable()
            if link.owner_id == user_id:
                raise InvalidArgument.single("token", "the owner cannot accept their own link")
            await uow.shares.lock_tunnel(link.tunnel_id)
            expire = await _accepted_expiry(uow, link, user_id, now)
            current = await chain.held_share(uow.shares, link.tunnel_id, user_id, now)
            if current is not None and _at_least(current, link.role, expire):
                await audit.record(
                    uow, trail, now, subject_user_id=link.owner_id, resource=current.share.name
                )
                return current.share
            if not await uow.shares.spend_link(link.id, now):
                raise _link_unusable()
            share = Share(
                link.tunnel_id,
                link.owner_id,
                user_id,
                link.role,
                expire,
                now,
                link.creator_id or link.owner_id,
                link.parent_grantee_id,
            )
            await uow.shares.put(share)
            await chain.narrow_below(uow.shares, share)
            await audit.record(
                uow, trail, now, subject_user_id=link.owner_id, resource=share.name, link=link.name
            )
        return share

    async def shared_with(
        self, user_id: str, *, page_size: int, page_token: str
    ) -> Page[SharedTunnel]:
        """Tunnels shared with ``user_id`` by shares that count now (unexpired, and every
        share they derive from too)."""
        query = self._query(page_size, page_token, f"grantee={user_id}")
        now = self._clock.now()
        async with self._uow(lag_tolerant=True) as uow:
            rows = await uow.shares.shared_with(user_id, now, query)
            page = self._lister.page(query, rows, lambda s: (s.create_time, s.tunnel.id))
            kept = [
                s
                for s in page.items
                if not s.parent_grantee_id
                or await chain.held_share(uow.shares, s.tunnel.id, user_id, now) is not None
            ]
        return Page(kept, page.next_page_token)


async def _held(uow: UnitOfWork, tunnel_id: str, user_id: str, now: datetime) -> chain.Held:
    """The share that lets a share holder grant, as it counts now (it may have ended since
    the call was authorized)."""
    held = await chain.held_share(uow.shares, tunnel_id, user_id, now)
    if held is None:
        raise chain.share_ended()
    return held


async def _accepted_expiry(
    uow: UnitOfWork, link: ShareLink, user_id: str, now: datetime
) -> datetime | None:
    """When a share accepted through ``link`` now would end: never after the share the link
    was made through, which must still grant the link's role."""
    expire = now + link.share_ttl if link.share_ttl is not None else None
    if not link.parent_grantee_id:
        return expire
    grantor = await chain.held_share(uow.shares, link.tunnel_id, link.parent_grantee_id, now)
    if grantor is None or grantor.role < link.role:
        raise _link_unusable()
    if user_id in grantor.chain:
        raise InvalidArgument.single("token", "the link was made through your own share")
    return chain.earliest(expire, grantor.expire_time)


def _at_least(current: chain.Held, role: ShareRole, expire: datetime | None) -> bool:
    """Whether a held share grants ``role`` or more for at least as long as ``expire``."""
    return current.role >= role and not chain.outlives(expire, current.expire_time)


async def _record(
    uow: UnitOfWork,
    trail: AuditTrail | None,
    now: datetime,
    resource: str,
    tunnel: Tunnel,
    holder_id: str,
    **details: Any,
) -> None:
    """The audit entry names what was changed, the owner whose tunnel it is, and the share
    the caller acted through, if any (the actor is the caller, in the trail's context)."""
    through = share_name(tunnel.user_id, tunnel.id, holder_id)
    if through:
        details["through_share"] = through
    await audit.record(
        uow, trail, now, subject_user_id=tunnel.user_id, resource=resource, **details
    )


def _check_expiry(
    expire: datetime | None, now: datetime, field: str, limit: timedelta, violations: Violations
) -> None:
    if expire is None:
        return
    if expire <= now:
        violations.add(field, "must be in the future")
    elif expire - now > limit:
        violations.add(field, f"must be at most {limit.days} days ahead")


def _link_unusable() -> FailedPrecondition:
    return FailedPrecondition(
        "the share link is expired, used up or revoked",
        [PreconditionViolation("SHARE_LINK", "token", "the link cannot be accepted")],
        reason="SHARE_LINK_UNUSABLE",
    )


async def _require_user(uow: UnitOfWork, user_id: str) -> None:
    user = await uow.users.get(user_id)
    if user is None or user.state.value != "active":
        raise NotFound("user", f"users/{user_id}")
