"""How far a share reaches when share holders share on.

A holder of an ``admin`` share may grant shares and make links of the tunnel, but only
within their own share. What they grant records the share it was granted through
(``parent_grantee_id``, the grantor's user id: a tunnel has one share per grantee), so
that a chain of grants is the same as one grant capped by its root:

- nothing granted through a share has a higher role or a later expiry than it (checked
  when granted, and narrowed when that share is changed to less);
- revoking a share revokes everything granted through it, at any depth;
- a share counts only while every share above it exists and has not expired (so a share
  whose grantor was erased grants nothing).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime, timedelta

from server.domain.common.errors import PermissionDenied, Violations
from server.domain.identity.model import ShareRole
from server.domain.tunnels.model import Share
from server.domain.tunnels.ports import ShareRepository

#: A longer chain (or a loop, which grants cannot make) grants nothing.
MAX_CHAIN = 32
EXCEEDS_GRANT = "EXCEEDS_GRANT"


@dataclass(frozen=True, slots=True)
class Held:
    """A share as it counts: role and expiry capped by every share above it."""

    share: Share
    role: ShareRole
    expire_time: datetime | None
    #: The holders from this share up to the root of its chain, this share's first.
    chain: tuple[str, ...]


def earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    """The earlier of two expiries (``None``: never)."""
    if a is None:
        return b
    return a if b is None else min(a, b)


def outlives(expire: datetime | None, limit: datetime | None) -> bool:
    """Whether an expiry is later than ``limit`` (``None``: never)."""
    return limit is not None and (expire is None or expire > limit)


async def _up(shares: ShareRepository, tunnel_id: str, grantee_id: str) -> list[Share]:
    """``grantee_id``'s share and those above it, as far as they are stored (at most
    :data:`MAX_CHAIN`, never round a loop). The chain is whole when the last one has no
    grantor."""
    found: list[Share] = []
    current = grantee_id
    while current and len(found) < MAX_CHAIN and all(s.grantee_id != current for s in found):
        share = await shares.get(tunnel_id, current)
        if share is None:
            break
        found.append(share)
        current = share.parent_grantee_id
    return found


async def held_share(
    shares: ShareRepository, tunnel_id: str, grantee_id: str, now: datetime
) -> Held | None:
    """What ``grantee_id``'s share of the tunnel grants now; ``None`` if nothing."""
    chain = await _up(shares, tunnel_id, grantee_id)
    if not chain or chain[-1].parent_grantee_id or any(s.expired(now) for s in chain):
        return None
    role = min(s.role for s in chain)
    expire = functools.reduce(earliest, (s.expire_time for s in chain), None)
    return Held(chain[0], role, expire, tuple(s.grantee_id for s in chain))


async def lineage(shares: ShareRepository, tunnel_id: str, grantee_id: str) -> tuple[str, ...]:
    """The holders from ``grantee_id``'s share up its chain, as far as it is stored."""
    return tuple(s.grantee_id for s in await _up(shares, tunnel_id, grantee_id))


async def descendants(shares: ShareRepository, tunnel_id: str, grantee_id: str) -> list[str]:
    """The holders of every share granted through ``grantee_id``'s, at any depth."""
    found: list[str] = []
    seen, frontier = {grantee_id}, [grantee_id]
    while frontier:
        frontier = [c for c in await shares.children(tunnel_id, frontier) if c not in seen]
        seen.update(frontier)
        found.extend(frontier)
    return found


async def narrow_below(shares: ShareRepository, share: Share) -> None:
    """Cap everything granted through ``share`` (at any depth) to its role and expiry.

    One cap for the whole subtree is enough: each share below was within its own grantor's
    share, so capping all of them to the new top keeps every one within its grantor's.
    """
    below = await descendants(shares, share.tunnel_id, share.grantee_id)
    await shares.narrow(share.tunnel_id, below, share.role, share.expire_time)
    await shares.narrow_links(
        share.tunnel_id, [share.grantee_id, *below], share.role, share.expire_time
    )


def check_role(held: Held, role: ShareRole, field: str, violations: Violations) -> None:
    """A share holder grants at most their own role."""
    if role > held.role:
        violations.add(
            field,
            f"must be at most SHARE_ROLE_{held.role.name}, the role of your own share",
            EXCEEDS_GRANT,
        )


def check_expiry(held: Held, expire: datetime | None, field: str, violations: Violations) -> None:
    """What a share holder grants ends no later than their own share."""
    if not outlives(expire, held.expire_time):
        return
    assert held.expire_time is not None
    ends = held.expire_time.isoformat()
    if expire is None:
        violations.add(field, f"is required: your own share ends at {ends}", EXCEEDS_GRANT)
    else:
        violations.add(
            field, f"must be no later than {ends}, when your own share ends", EXCEEDS_GRANT
        )


def check_ttl(
    held: Held, ttl: timedelta | None, now: datetime, field: str, violations: Violations
) -> None:
    """Shares made through a share holder's link cannot be meant to outlive their share."""
    if ttl is None or held.expire_time is None or now + ttl <= held.expire_time:
        return
    left = int((held.expire_time - now).total_seconds())
    violations.add(
        field,
        f"must be at most {left}s: your own share ends at {held.expire_time.isoformat()}",
        EXCEEDS_GRANT,
    )


def not_grantor() -> PermissionDenied:
    """A share holder acting on something not granted through their share."""
    return PermissionDenied(
        "only what was granted through your own share is yours to change",
        reason="NOT_GRANTOR",
    )


def share_ended() -> PermissionDenied:
    """The share that let the caller in has ended since the call was authorized."""
    return PermissionDenied("your share of the tunnel has ended", reason="SHARE_ENDED")
