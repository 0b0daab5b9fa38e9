"""Authentication: turn a bearer credential into a :class:`Principal`.

A JWT access token is verified offline (signature and claims, cached), then one batched
read of the shared store answers three questions at once: was this token revoked
(logout), was its session revoked (logout, refresh-token reuse), and what are the
subject's current role, tier and state (cached, invalidated on change). Role and tier
changes therefore take effect on the next call, on every replica.

A stream outlives the access token that opened it: re-checked while it runs
(``established=True``), the token's ``exp`` may have passed, and its session (the family of
refresh tokens it was issued for) decides instead. Everything else is checked as on a call.
A session the table showed live is believed for a short while (``session_cache_ttl``, never
longer than an access token lives) without reading it again, so that a watch re-checked at
every event does not read the table at every event: a revocation meanwhile is still seen at
once, by the marker it leaves in the shared store for as long as an access token lives.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime

from server.domain.common.clock import Clock
from server.domain.common.errors import Unauthenticated
from server.domain.identity.api_keys import ApiKeyService
from server.domain.identity.cache import CachedLookup
from server.domain.identity.model import CredentialKind, Principal, Role, Tier, UserState
from server.domain.identity.ports import KeyValueStore
from server.domain.identity.rules import permissions_for
from server.domain.identity.tokens import LEEWAY_SECONDS, TokenService
from server.domain.unit_of_work import UnitOfWorkFactory

SUBJECT_CACHE_TTL = 300.0
#: The same, when the cache is in this process's memory (no Redis): a change made by
#: another process (``python -m server create-admin``) cannot reach it to invalidate it.
LOCAL_SUBJECT_CACHE_TTL = 5.0
#: Sessions remembered as live at once, per process (the least recently seen go first).
SESSION_CACHE_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class SubjectState:
    """What authorization needs to know about a user, cached."""

    role: Role
    tier: Tier
    active: bool


class SubjectDirectory:
    """Cached role, tier and state of users."""

    def __init__(
        self, uow: UnitOfWorkFactory, kv: KeyValueStore, *, ttl: float = SUBJECT_CACHE_TTL
    ) -> None:
        self._uow = uow
        self._lookup: CachedLookup[SubjectState] = CachedLookup(
            kv,
            "subject",
            ttl=ttl,
            encode=lambda s: json.dumps([s.role.value, s.tier.value, s.active]).encode(),
            decode=_decode_state,
        )

    def key(self, user_id: str) -> str:
        """The store key of a user's cached state."""
        return self._lookup.key(user_id)

    async def resolve(self, user_id: str, raw: bytes | None) -> SubjectState | None:
        """The state of ``user_id`` from a pre-fetched cache value (or storage)."""
        return await self._lookup.resolve(user_id, raw, lambda: self._load(user_id))

    async def invalidate(self, user_id: str) -> None:
        """Forget a user's cached state after their role, tier or state changed."""
        await self._lookup.invalidate(user_id)

    async def _load(self, user_id: str) -> SubjectState | None:
        async with self._uow(readonly=True) as uow:
            user = await uow.users.get(user_id)
        if user is None:
            return None
        return SubjectState(user.role, user.tier, user.state == UserState.ACTIVE)


def _decode_state(raw: bytes) -> SubjectState:
    role, tier, active = json.loads(raw)
    return SubjectState(Role(role), Tier(tier), bool(active))


class Revocations:
    """Revoked access tokens and sessions, kept until their tokens would expire anyway."""

    def __init__(self, kv: KeyValueStore, clock: Clock, access_ttl: float) -> None:
        self._kv = kv
        self._clock = clock
        self._access_ttl = access_ttl

    @staticmethod
    def token_key(token_id: str) -> str:
        """Store key of a revoked token id."""
        return f"revoked:jti:{token_id}"

    @staticmethod
    def session_key(session_id: str) -> str:
        """Store key of a revoked session id."""
        return f"revoked:sid:{session_id}"

    async def revoke_token(self, token_id: str, expires_at: float) -> None:
        """Refuse this access token from now on."""
        ttl = max(expires_at - self._clock.time(), 0.0) + LEEWAY_SECONDS
        await self._kv.set(self.token_key(token_id), b"1", ttl)

    async def revoke_sessions(self, session_ids: list[str]) -> None:
        """Refuse every access token of these sessions from now on."""
        for session_id in session_ids:
            await self._kv.set(
                self.session_key(session_id), b"1", self._access_ttl + LEEWAY_SECONDS
            )


class Authenticator:
    """Verifies ``authorization: Bearer ...`` credentials and access tokens."""

    def __init__(
        self,
        tokens: TokenService,
        subjects: SubjectDirectory,
        revocations: Revocations,
        api_keys: ApiKeyService,
        kv: KeyValueStore,
        uow: UnitOfWorkFactory,
        clock: Clock,
        *,
        session_cache_ttl: float = 0.0,
    ) -> None:
        self._uow = uow
        self._tokens = tokens
        self._subjects = subjects
        self._revocations = revocations
        self._api_keys = api_keys
        self._kv = kv
        self._clock = clock
        # Capped by the access-token lifetime: a revocation's marker lasts that long, so it
        # covers every moment a session is believed live without a read.
        self._session_ttl = min(session_cache_ttl, tokens.ttl)
        #: Session id -> (its end, until when on the monotonic clock it is believed live).
        self._live_sessions: OrderedDict[str, tuple[datetime, float]] = OrderedDict()

    async def authenticate(self, authorization: str, *, established: bool = False) -> Principal:
        """The caller behind an ``authorization`` value; :class:`Unauthenticated` if none.

        ``established``: the credential already opened the stream being re-checked, so an
        access token past its ``exp`` still counts while its session lives (an API key's
        own expiry still ends it).
        """
        scheme, _, credential = authorization.strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise Unauthenticated(
                "send credentials as 'authorization: Bearer <token>'",
                reason="CREDENTIALS_MALFORMED",
            )
        if credential.startswith("tp_"):
            return await self._api_key(credential)
        return await self._session(credential, established=established)

    async def authenticate_access_token(
        self, token: str, *, established: bool = False
    ) -> Principal:
        """The caller behind a bare access token (the access cookie): a session's JWT,
        never an API key. ``established`` as for :meth:`authenticate`."""
        if not token or token.startswith("tp_"):
            raise Unauthenticated("the access cookie holds no access token", reason="TOKEN_INVALID")
        return await self._session(token, established=established)

    async def _session(self, token: str, *, established: bool) -> Principal:
        claims = self._tokens.verify(token, expired_ok=established)
        raw_token, raw_session, raw_subject = await self._kv.get_many(
            [
                Revocations.token_key(claims.token_id),
                Revocations.session_key(claims.session_id),
                self._subjects.key(claims.subject),
            ]
        )
        if raw_token is not None or raw_session is not None:
            raise Unauthenticated("access token revoked", reason="TOKEN_REVOKED")
        degraded = self._kv.degraded
        expired = established and self._tokens.expired(claims)
        if (degraded or expired) and not await self._session_live(
            claims.session_id, cached=not degraded
        ):
            if degraded:
                # Revocation markers made before the outage are in Redis, out of reach now;
                # the session table is the source of truth for them.
                raise Unauthenticated("access token revoked", reason="TOKEN_REVOKED")
            # Markers outlive only the tokens they refuse: past its exp, a stream's token
            # is as good as its session, which the session table knows.
            raise Unauthenticated("the session has ended", reason="SESSION_ENDED")
        state = await self._subjects.resolve(claims.subject, raw_subject)
        if state is None or not state.active:
            raise Unauthenticated("account is not active", reason="ACCOUNT_INACTIVE")
        return Principal(
            user_id=claims.subject,
            role=state.role,
            tier=state.tier,
            credential=CredentialKind.SESSION,
            permissions=permissions_for(state.role),
            session_id=claims.session_id,
            token_id=claims.token_id,
            token_expires_at=claims.expires_at,
        )

    async def _session_live(self, session_id: str, *, cached: bool) -> bool:
        """Whether the session exists, is not revoked and has not reached its end. With
        ``cached`` the table's answer of a moment ago will do: a revocation since then has
        left a marker, which the caller has read already."""
        now = self._clock.now()
        if cached and self._believed_live(session_id, now):
            return True
        async with self._uow(readonly=True) as uow:
            session = await uow.sessions.get_session(session_id)
        if session is None or session.revoke_time is not None or session.expire_time <= now:
            self._live_sessions.pop(session_id, None)
            return False
        if self._session_ttl > 0:
            self._live_sessions[session_id] = (
                session.expire_time,
                time.monotonic() + self._session_ttl,
            )
            self._live_sessions.move_to_end(session_id)
            if len(self._live_sessions) > SESSION_CACHE_SIZE:
                self._live_sessions.popitem(last=False)
        return True

    def _believed_live(self, session_id: str, now: datetime) -> bool:
        remembered = self._live_sessions.get(session_id)
        if remembered is None:
            return False
        ends, fresh_until = remembered
        if ends > now and fresh_until > time.monotonic():
            return True
        del self._live_sessions[session_id]
        return False

    async def _api_key(self, secret: str) -> Principal:
        identity = await self._api_keys.identify(secret)
        if identity is None:
            raise Unauthenticated("invalid, expired or revoked API key", reason="API_KEY_INVALID")
        (raw_subject,) = await self._kv.get_many([self._subjects.key(identity.user_id)])
        state = await self._subjects.resolve(identity.user_id, raw_subject)
        if state is None or not state.active:
            raise Unauthenticated("account is not active", reason="ACCOUNT_INACTIVE")
        return Principal(
            user_id=identity.user_id,
            role=state.role,
            tier=state.tier,
            credential=CredentialKind.API_KEY,
            permissions=permissions_for(state.role, identity.scopes or None),
            api_key_id=identity.key_id,
            bound_tunnel=identity.tunnel_id,
        )
