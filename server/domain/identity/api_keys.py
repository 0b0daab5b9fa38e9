"""API keys: ``tp_`` + 32 random base62 characters + a 6-character CRC32 checksum.

The checksum lets secret scanners recognise a key and lets the server drop a mistyped or
made-up key without a database read. Only the SHA-256 of a key is stored, with a short
display prefix. A rotated key keeps working for an overlap window; revocation takes
effect at once on every replica (the cached lookup is invalidated after commit). A caller
creates or rotates only keys that can do no more than it can
(:func:`~server.domain.identity.rules.check_grant`).
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta

from server.domain.audit import service as audit
from server.domain.audit.model import AuditTrail
from server.domain.common.clock import Clock
from server.domain.common.errors import FailedPrecondition, InvalidArgument, NotFound, Violations
from server.domain.common.ids import is_id, new_id
from server.domain.common.listing import Lister, ListSpec, OrderKey, Page
from server.domain.common.names import api_key_name
from server.domain.common.validation import display_name as valid_display_name
from server.domain.identity.cache import CachedLookup
from server.domain.identity.model import ApiKey, CreatedKey, KeyIdentity, Principal, Role, UserState
from server.domain.identity.ports import ApiKeyRepository, KeyValueStore
from server.domain.identity.rules import (
    AGENT_PERMISSIONS,
    AGENT_SCOPE,
    ROLE_PERMISSIONS,
    check_grant,
    display_prefix,
    generate_secret,
    hash_secret,
    is_agent_key,
    looks_like_key,
    state_of,
)
from server.domain.unit_of_work import UnitOfWork, UnitOfWorkFactory

MAX_OVERLAP = timedelta(days=7)
MAX_SCOPES = 50
#: How often the last-use time of a key is written at most.
LAST_USE_RESOLUTION = timedelta(minutes=1)

LIST_SPEC = ListSpec(
    filter_fields={},
    order_fields=frozenset({"create_time"}),
    default_order=(OrderKey("create_time", descending=True),),
)


def _encode_identity(identity: KeyIdentity) -> bytes:
    return json.dumps(
        [
            identity.key_id,
            identity.user_id,
            sorted(identity.scopes),
            identity.expire_time,
            identity.last_use_time,
            identity.tunnel_id,
        ]
    ).encode()


def _decode_identity(raw: bytes) -> KeyIdentity:
    key_id, user_id, scopes, expire, last_use, *rest = json.loads(raw)
    tunnel_id = rest[0] if rest else ""  # entries cached before keys had a tunnel
    return KeyIdentity(key_id, user_id, frozenset(scopes), expire, last_use, tunnel_id)


class ApiKeyService:
    """Create, list, rotate, revoke and authenticate API keys."""

    def __init__(
        self,
        uow: UnitOfWorkFactory,
        kv: KeyValueStore,
        lister: Lister,
        clock: Clock,
        *,
        default_overlap: timedelta,
    ) -> None:
        self._uow = uow
        self._lister = lister
        self._clock = clock
        self._default_overlap = default_overlap
        self._lookup: CachedLookup[KeyIdentity] = CachedLookup(
            kv, "apikey", ttl=300.0, encode=_encode_identity, decode=_decode_identity
        )

    async def create(
        self,
        actor: Principal,
        owner_id: str,
        display_name: str,
        scopes: list[str],
        expire_time: datetime | None,
        tunnel: str = "",
        trail: AuditTrail | None = None,
    ) -> CreatedKey:
        """A new key for ``owner_id``; scopes must be a subset of the owner's permissions,
        and the key may do nothing that ``actor`` cannot. An agent key may be bound to one
        of the owner's tunnels (``tunnel``, its name)."""
        violations = Violations()
        name = valid_display_name(display_name, "api_key.display_name", violations)
        now = self._clock.now()
        if expire_time is not None and expire_time <= now:
            violations.add("api_key.expire_time", "must be in the future")
        secret = generate_secret()
        async with self._uow() as uow:
            owner = await uow.users.get(owner_id)
            if owner is None or owner.state != UserState.ACTIVE:
                raise NotFound("user", f"users/{owner_id}")
            clean_scopes = _check_scopes(scopes, owner.role, violations)
            tunnel_id = await _check_tunnel(uow, tunnel, owner_id, clean_scopes, violations)
            violations.raise_if_any()
            check_grant(actor.permissions, owner.role, clean_scopes, "create")
            key = ApiKey(
                id=new_id("key"),
                user_id=owner_id,
                display_name=name,
                prefix=display_prefix(secret),
                secret_hash=hash_secret(secret),
                scopes=clean_scopes,
                create_time=now,
                expire_time=expire_time,
                tunnel_id=tunnel_id,
            )
            await uow.api_keys.add(key)
            await audit.record(uow, trail, now, subject_user_id=owner_id, resource=key.name)
        return CreatedKey(key, secret)

    async def get(self, user_id: str, key_id: str) -> ApiKey:
        """One key of ``user_id``."""
        async with self._uow(lag_tolerant=True) as uow:
            return await self._load(uow.api_keys, user_id, key_id)

    async def list(
        self, user_id: str, *, page_size: int, page_token: str, show_inactive: bool
    ) -> Page[ApiKey]:
        """A page of ``user_id``'s keys, newest first."""
        query = self._lister.query(
            LIST_SPEC,
            page_size=page_size,
            page_token=page_token,
            scope=f"{user_id}|{show_inactive}",
        )
        async with self._uow(lag_tolerant=True) as uow:
            active_at = None if show_inactive else self._clock.now()
            rows = await uow.api_keys.list(user_id, query, active_at=active_at)
        return self._lister.page(query, rows, lambda k: (k.create_time, k.id))

    async def rotate(
        self,
        actor: Principal,
        user_id: str,
        key_id: str,
        overlap: timedelta | None,
        trail: AuditTrail | None = None,
    ) -> tuple[CreatedKey, ApiKey]:
        """A new key with the old one's name and scopes; the old one expires after ``overlap``.
        Only an ``actor`` that may do everything the key may do gets its new secret."""
        overlap = self._default_overlap if overlap is None else overlap
        if overlap < timedelta(0) or overlap > MAX_OVERLAP:
            raise InvalidArgument.single("overlap", "must be between 0 seconds and 7 days")
        now = self._clock.now()
        async with self._uow() as uow:
            old = await self._load(uow.api_keys, user_id, key_id)
            owner = await uow.users.get(user_id)
            if owner is None:
                raise NotFound("api key", api_key_name(user_id, key_id))
            check_grant(actor.permissions, owner.role, old.scopes, "rotate")
            if state_of(old, now) != "active":
                raise FailedPrecondition(f"API key is {state_of(old, now)}", reason="KEY_INACTIVE")
            secret = generate_secret()
            new = replace(
                old,
                id=new_id("key"),
                prefix=display_prefix(secret),
                secret_hash=hash_secret(secret),
                create_time=now,
                last_use_time=None,
                replaced_by="",
            )
            end = now + overlap
            old_end = end if old.expire_time is None else min(old.expire_time, end)
            await uow.api_keys.add(new)
            await uow.api_keys.update(old.id, expire_time=old_end, replaced_by=new.id)
            await audit.record(
                uow, trail, now, subject_user_id=user_id, resource=old.name, replaced_by=new.name
            )
            uow.after_commit(lambda: self._lookup.invalidate(old.secret_hash))
        return CreatedKey(new, secret), replace(old, expire_time=old_end, replaced_by=new.id)

    async def revoke(self, user_id: str, key_id: str, trail: AuditTrail | None = None) -> ApiKey:
        """Revoke a key now; revoking twice is a no-op that returns the key."""
        now = self._clock.now()
        async with self._uow() as uow:
            key = await self._load(uow.api_keys, user_id, key_id)
            if key.revoke_time is None:
                key = replace(key, revoke_time=now)
                await uow.api_keys.update(key.id, revoke_time=now)
                uow.after_commit(lambda: self._lookup.invalidate(key.secret_hash))
            await audit.record(uow, trail, now, subject_user_id=user_id, resource=key.name)
        return key

    async def identify(self, secret: str) -> KeyIdentity | None:
        """The key a secret belongs to, if it is active; ``None`` otherwise."""
        if not looks_like_key(secret):
            return None
        secret_hash = hash_secret(secret)
        identity = await self._lookup.get(secret_hash, lambda: self._load_identity(secret_hash))
        if identity is None:
            return None
        now = self._clock.time()
        if identity.expire_time is not None and identity.expire_time <= now:
            return None
        if identity.last_use_time is None or now - identity.last_use_time > 60:
            await self._record_use(identity, secret_hash)
        return identity

    async def _record_use(self, identity: KeyIdentity, secret_hash: str) -> None:
        now = self._clock.now()
        async with self._uow() as uow:
            await uow.api_keys.update(identity.key_id, last_use_time=now)
        await self._lookup.invalidate(secret_hash)

    async def _load_identity(self, secret_hash: str) -> KeyIdentity | None:
        async with self._uow(readonly=True) as uow:
            key = await uow.api_keys.find_by_hash(secret_hash)
        if key is None or key.revoke_time is not None:
            return None
        return KeyIdentity(
            key.id,
            key.user_id,
            frozenset(key.scopes),
            key.expire_time.timestamp() if key.expire_time else None,
            key.last_use_time.timestamp() if key.last_use_time else None,
            key.tunnel_id,
        )

    @staticmethod
    async def _load(keys: ApiKeyRepository, user_id: str, key_id: str) -> ApiKey:
        key = await keys.get(user_id, key_id)
        if key is None:
            raise NotFound("api key", api_key_name(user_id, key_id))
        return key


async def _check_tunnel(
    uow: UnitOfWork, tunnel: str, owner_id: str, scopes: tuple[str, ...], violations: Violations
) -> str:
    """The id of the tunnel an agent key is bound to ('' for none)."""
    if not tunnel:
        return ""
    field = "api_key.tunnel"
    if not is_agent_key(frozenset(scopes)):
        violations.add(field, f"only an agent key (scopes exactly {AGENT_SCOPE}) has a tunnel")
        return ""
    parts = tunnel.split("/")
    if (
        len(parts) != 4
        or parts[0] != "users"
        or parts[2] != "tunnels"
        or not is_id(parts[3], "tun")
    ):
        violations.add(field, "must look like users/{user}/tunnels/{tunnel}")
        return ""
    found = await uow.tunnels.get(parts[3])
    if found is None or found.user_id != owner_id or parts[1] not in {owner_id, "me"}:
        violations.add(field, "must be one of the owner's tunnels")
        return ""
    return found.id


def _check_scopes(scopes: list[str], role: Role, violations: Violations) -> tuple[str, ...]:
    if len(scopes) > MAX_SCOPES:
        violations.add("api_key.scopes", f"at most {MAX_SCOPES} scopes")
        return ()
    granted = ROLE_PERMISSIONS[role] | AGENT_PERMISSIONS  # anyone may mint an agent key
    if AGENT_SCOPE in scopes and len(set(scopes)) > 1:
        violations.add("api_key.scopes", f"{AGENT_SCOPE} must be the only scope of an agent key")
    for index, scope in enumerate(scopes):
        if scope not in granted:
            violations.add(
                f"api_key.scopes[{index}]",
                f"{scope!r} is not a permission of the owner's role ({role.value})",
            )
    return tuple(sorted(set(scopes)))
