"""Sharing tunnels: shares to named users, and share links anyone signed in may accept."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from server.domain.clock import Clock
from server.domain.ids import new_id
from server.domain.listing import Lister, ListQuery, ListSpec, OrderKey, Page
from server.domain.ports import UnitOfWork, UnitOfWorkFactory
from server.domain.principal import ShareRole
from server.domain.tunnels import Tunnel, tunnel_name
from server.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PreconditionViolation,
    Violations,
)

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


@dataclass(frozen=True, slots=True)
class Share:
    """A user's access to someone else's tunnel."""

    tunnel_id: str
    owner_id: str
    grantee_id: str
    role: ShareRole
    expire_time: datetime | None
    create_time: datetime
    creator_id: str

    @property
    def name(self) -> str:
        """``users/{owner}/tunnels/{tunnel}/shares/{grantee}``."""
        return f"{tunnel_name(self.owner_id, self.tunnel_id)}/shares/{self.grantee_id}"

    def expired(self, now: datetime) -> bool:
        """Whether the share no longer grants anything."""
        return self.expire_time is not None and self.expire_time <= now


@dataclass(frozen=True, slots=True)
class ShareLink:
    """A link that grants a share to whoever accepts it, a limited number of times."""

    id: str
    tunnel_id: str
    owner_id: str
    role: ShareRole
    max_uses: int
    use_count: int
    expire_time: datetime
    share_ttl: timedelta | None
    create_time: datetime
    revoke_time: datetime | None = None

    @property
    def name(self) -> str:
        """``users/{owner}/tunnels/{tunnel}/shareLinks/{link}``."""
        return f"{tunnel_name(self.owner_id, self.tunnel_id)}/shareLinks/{self.id}"

    def active(self, now: datetime) -> bool:
        """Whether the link can still be accepted."""
        return (
            self.revoke_time is None and self.expire_time > now and self.use_count < self.max_uses
        )


@dataclass(frozen=True, slots=True)
class SharedTunnel:
    """A tunnel shared with someone, with their role on it."""

    tunnel: Tunnel
    role: ShareRole
    expire_time: datetime | None
    create_time: datetime


def token_hash(token: str) -> str:
    """How a link token is stored."""
    return hashlib.sha256(token.encode()).hexdigest()


class ShareService:
    """Shares and share links, after authorization has allowed the call."""

    def __init__(self, uow: UnitOfWorkFactory, lister: Lister, clock: Clock) -> None:
        self._uow = uow
        self._lister = lister
        self._clock = clock

    async def share_role(self, resource: str, user_id: str) -> ShareRole:
        """The caller's unexpired share of the tunnel ``resource`` names (or lives under)."""
        parts = resource.split("/")
        if len(parts) < 4 or parts[0] != "users" or parts[2] != "tunnels":
            return ShareRole.NONE
        async with self._uow(readonly=True) as uow:
            share = await uow.shares.get(parts[3], user_id)
        if share is None or share.owner_id != parts[1] or share.expired(self._clock.now()):
            return ShareRole.NONE
        return share.role

    async def grant(
        self,
        tunnel: Tunnel,
        grantee_id: str,
        role: ShareRole,
        expire_time: datetime | None,
        *,
        creator_id: str,
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
        async with self._uow() as uow:
            await _require_user(uow, grantee_id)
            share = Share(tunnel.id, tunnel.user_id, grantee_id, role, expire_time, now, creator_id)
            await uow.shares.put(share)
        return share

    async def list(self, tunnel: Tunnel, *, page_size: int, page_token: str) -> Page[Share]:
        """The tunnel's shares, oldest first."""
        query = self._query(page_size, page_token, f"shares={tunnel.id}")
        async with self._uow(readonly=True) as uow:
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

    async def revoke(self, tunnel: Tunnel, grantee_id: str) -> Share:
        """Remove a share at once."""
        async with self._uow() as uow:
            share = await uow.shares.get(tunnel.id, grantee_id)
            if share is None:
                raise NotFound("share", f"{tunnel.name}/shares/{grantee_id}")
            await uow.shares.delete(tunnel.id, grantee_id)
        return share

    async def create_link(
        self,
        tunnel: Tunnel,
        role: ShareRole,
        max_uses: int,
        expire_time: datetime | None,
        share_ttl: timedelta | None,
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
        link = ShareLink(
            new_id("lnk", now.timestamp()),
            tunnel.id,
            tunnel.user_id,
            role,
            max_uses,
            0,
            expire_time or now + DEFAULT_LINK_TTL,
            share_ttl,
            now,
        )
        async with self._uow() as uow:
            await uow.shares.add_link(link, token_hash(token))
        return link, token

    async def list_links(
        self, tunnel: Tunnel, *, page_size: int, page_token: str
    ) -> Page[ShareLink]:
        """The tunnel's links, oldest first."""
        query = self._query(page_size, page_token, f"links={tunnel.id}")
        async with self._uow(readonly=True) as uow:
            rows = await uow.shares.list_links(tunnel.id, query)
        return self._lister.page(query, rows, lambda link: (link.create_time, link.id))

    async def revoke_link(self, tunnel: Tunnel, link_id: str) -> ShareLink:
        """Stop a link from being accepted (shares made through it stay)."""
        async with self._uow() as uow:
            link = await uow.shares.revoke_link(tunnel.id, link_id, self._clock.now())
        if link is None:
            raise NotFound("share link", f"{tunnel.name}/shareLinks/{link_id}")
        return link

    async def accept(self, token: str, user_id: str) -> Share:
        """Spend one use of a link on the caller's share (never lowering a better one)."""
        if not token.startswith(LINK_PREFIX) or len(token) > 100:
            raise InvalidArgument.single("token", "is not a share link token")
        now = self._clock.now()
        async with self._uow() as uow:
            link = await uow.shares.find_link(token_hash(token))
            if link is None or not link.active(now):
                raise _link_unusable()
            if link.owner_id == user_id:
                raise InvalidArgument.single("token", "the owner cannot accept their own link")
            if not await uow.shares.spend_link(link.id, now):
                raise _link_unusable()
            existing = await uow.shares.get(link.tunnel_id, user_id)
            expire = now + link.share_ttl if link.share_ttl is not None else None
            role = link.role
            if existing is not None and not existing.expired(now):
                role = max(role, existing.role)
                expire = (
                    None if existing.expire_time is None else max_time(expire, existing.expire_time)
                )
            share = Share(link.tunnel_id, link.owner_id, user_id, role, expire, now, link.owner_id)
            await uow.shares.put(share)
        return share

    async def shared_with(
        self, user_id: str, *, page_size: int, page_token: str
    ) -> Page[SharedTunnel]:
        """Tunnels shared with ``user_id`` by unexpired shares."""
        query = self._query(page_size, page_token, f"grantee={user_id}")
        async with self._uow(readonly=True) as uow:
            rows = await uow.shares.shared_with(user_id, self._clock.now(), query)
        return self._lister.page(query, rows, lambda s: (s.create_time, s.tunnel.id))


def max_time(a: datetime | None, b: datetime) -> datetime:
    """The later of two times (``a`` may be unset)."""
    return b if a is None else max(a, b)


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
