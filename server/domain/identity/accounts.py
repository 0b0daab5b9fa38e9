"""Accounts and sessions: register, sign in, refresh, sign out.

A session is a family of refresh tokens. Each refresh spends the presented token with one
conditional update (so two concurrent refreshes cannot both win) and issues a new one.
Presenting a token that was already spent revokes the whole family and its access
tokens (RFC 9700 section 4.14.2): either the client or an attacker holds a stolen copy,
and the server cannot tell which.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import NoReturn

from server.domain.audit import service as audit
from server.domain.audit.model import AuditTrail
from server.domain.common import validation
from server.domain.common.clock import Clock
from server.domain.common.errors import (
    AlreadyExists,
    PermissionDenied,
    Unauthenticated,
    Violations,
)
from server.domain.common.ids import new_id
from server.domain.events import service as events
from server.domain.events.ports import EventBus
from server.domain.identity.authentication import Revocations
from server.domain.identity.model import (
    ClientInfo,
    Preferences,
    Principal,
    RefreshToken,
    Role,
    Session,
    SessionTokens,
    Tier,
    User,
    UserState,
)
from server.domain.identity.passwords import PasswordHasher
from server.domain.identity.rules import hash_refresh_token
from server.domain.identity.throttle import LoginThrottle
from server.domain.identity.tokens import TokenService
from server.domain.unit_of_work import UnitOfWork, UnitOfWorkFactory

_INVALID_REFRESH = "REFRESH_TOKEN_INVALID"
_EXPIRED_REFRESH = "REFRESH_TOKEN_EXPIRED"

#: States whose password is checked at sign-in (a suspended user is told so, then refused).
SIGN_IN_STATES = frozenset({UserState.ACTIVE, UserState.SUSPENDED})


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """Lifetimes of refresh tokens."""

    absolute_ttl: timedelta
    idle_ttl: timedelta


class AccountService:
    """Registration and the session life cycle."""

    def __init__(
        self,
        uow: UnitOfWorkFactory,
        hasher: PasswordHasher,
        tokens: TokenService,
        throttle: LoginThrottle,
        revocations: Revocations,
        clock: Clock,
        policy: SessionPolicy,
        bus: EventBus,
    ) -> None:
        self._bus = bus
        self._uow = uow
        self._hasher = hasher
        self._tokens = tokens
        self._throttle = throttle
        self._revocations = revocations
        self._clock = clock
        self._policy = policy

    async def register(
        self,
        email: str,
        password: str,
        display_name: str,
        *,
        role: Role = Role.USER,
        trail: AuditTrail | None = None,
    ) -> User:
        """A new active user on the free tier."""
        violations = Violations()
        normalized = validation.email(email, "email", violations)
        validation.password(password, email, "password", violations)
        if display_name or normalized:
            # Defaults to the part before the @, which is only known for a valid address.
            fallback = normalized.partition("@")[0]
            name = validation.display_name(display_name or fallback, "display_name", violations)
        violations.raise_if_any()
        # A taken address is refused before hashing: a duplicate costs no Argon2 time (it
        # says no more than ALREADY_EXISTS says anyway). The insert still decides a race.
        async with self._uow(readonly=True) as uow:
            if await uow.users.get_credentials(normalized) is not None:
                raise AlreadyExists("user", normalized)
        password_hash = await self._hasher.hash(password)
        now = self._clock.now()
        user = User(
            id=new_id("usr"),
            email=normalized,
            display_name=name,
            role=role,
            tier=Tier.FREE,
            state=UserState.ACTIVE,
            preferences=Preferences(),
            create_time=now,
            update_time=now,
        )
        async with self._uow() as uow:
            await uow.users.add(user, password_hash)
            await audit.record(uow, trail, now, subject_user_id=user.id, resource=user.name)
            await events.record(
                uow,
                self._bus,
                self._clock,
                "user.created",
                subject=user.name,
                user_id=user.id,
                actor=user.name,
                payload={"name": user.name, "tier": user.tier.value, "role": user.role.value},
            )
        return user

    async def login(
        self, email: str, password: str, client: ClientInfo, trail: AuditTrail | None = None
    ) -> tuple[User, SessionTokens]:
        """Check a password and start a session. Failures are throttled and never say which
        part was wrong."""
        violations = Violations()
        if not email:
            violations.add("email", "is required", "REQUIRED")
        if not password:
            violations.add("password", "is required", "REQUIRED")
        if len(email) > validation.MAX_EMAIL or len(password) > 4 * validation.MAX_PASSWORD:
            violations.add("email" if len(email) > validation.MAX_EMAIL else "password", "too long")
        if "\x00" in email:  # no address contains one, and PostgreSQL text cannot hold it
            violations.add("email", "must not contain NUL characters")
        violations.raise_if_any()
        normalized = email.strip().lower()
        audit.note(trail, email=normalized)
        await self._throttle.check(normalized, client.ip_address)
        async with self._uow(readonly=True) as uow:
            credentials = await uow.users.get_credentials(normalized)
        usable = credentials is not None and credentials.user.state in SIGN_IN_STATES
        stored = credentials.password_hash if credentials is not None and usable else None
        if not await self._hasher.verify(stored, password):
            await self._throttle.failed(normalized, client.ip_address)
            if credentials is not None:
                audit.note(trail, subject_user_id=credentials.user.id)
            raise Unauthenticated("email or password is incorrect", reason="INVALID_CREDENTIALS")
        assert credentials is not None
        if credentials.user.state == UserState.SUSPENDED:  # told only with the right password
            audit.note(trail, subject_user_id=credentials.user.id)
            raise PermissionDenied(
                "this account is suspended; contact support", reason="ACCOUNT_SUSPENDED"
            )
        await self._throttle.succeeded(normalized, client.ip_address)
        user = credentials.user
        assert stored is not None
        rehash = await self._hasher.rehash(stored, password)
        tokens = await self._start_session(user, client, rehash, trail)
        return replace(user, last_login_time=tokens.issue_time), tokens

    async def _start_session(
        self, user: User, client: ClientInfo, rehash: str | None, trail: AuditTrail | None
    ) -> SessionTokens:
        now = self._clock.now()
        session = Session(
            id=new_id("ses"),
            user_id=user.id,
            create_time=now,
            expire_time=now + self._policy.absolute_ttl,
            ip_address=client.ip_address,
            user_agent=client.user_agent[:512],
        )
        secret, token = self._new_refresh_token(session, now)
        async with self._uow() as uow:
            await uow.sessions.add_session(session)
            await uow.sessions.add_token(token)
            await uow.users.touch(user.id, last_login_time=now)
            if rehash is not None:
                await uow.users.set_password_hash(user.id, rehash)
            await audit.record(uow, trail, now, subject_user_id=user.id, resource=user.name)
        access = self._tokens.issue(user.id, session.id)
        return SessionTokens(access, secret, token.expire_time, now)

    def _new_refresh_token(self, session: Session, now: datetime) -> tuple[str, RefreshToken]:
        secret = secrets.token_urlsafe(32)
        expire = min(session.expire_time, now + self._policy.idle_ttl)
        token = RefreshToken(
            id=new_id("rtk"),
            session_id=session.id,
            user_id=session.user_id,
            token_hash=hash_refresh_token(secret),
            create_time=now,
            expire_time=expire,
        )
        return secret, token

    async def refresh(self, secret: str, trail: AuditTrail | None = None) -> SessionTokens:
        """Spend a refresh token for a new pair. Reuse of a spent token revokes its session."""
        if not secret or len(secret) > 256:
            raise Unauthenticated(
                "refresh token missing or malformed", reason="REFRESH_TOKEN_INVALID"
            )
        token_hash = hash_refresh_token(secret)
        now = self._clock.now()
        async with self._uow() as uow:
            spent = await uow.sessions.spend_token(token_hash, now)
            if spent is not None:
                new_secret, new_token = await self._renew(uow, spent, now, trail)
        if spent is None:
            await self._refused_refresh(token_hash, now, trail)
        access = self._tokens.issue(spent.user_id, spent.session_id)
        return SessionTokens(access, new_secret, new_token.expire_time, now)

    async def _renew(
        self, uow: UnitOfWork, spent: RefreshToken, now: datetime, trail: AuditTrail | None
    ) -> tuple[str, RefreshToken]:
        audit.note(trail, subject_user_id=spent.user_id)
        session = await uow.sessions.get_session(spent.session_id)
        user = await uow.users.get(spent.user_id)
        if session is None or user is None or user.state != UserState.ACTIVE:
            raise Unauthenticated("session has ended", reason="SESSION_ENDED")
        new_secret, new_token = self._new_refresh_token(session, now)
        await uow.sessions.add_token(new_token)
        await audit.record(uow, trail, now)
        return new_secret, new_token

    async def _refused_refresh(
        self, token_hash: str, now: datetime, trail: AuditTrail | None
    ) -> NoReturn:
        async with self._uow() as uow:
            token = await uow.sessions.find_token(token_hash)
            if token is None:
                raise Unauthenticated("refresh token is not valid", reason=_INVALID_REFRESH)
            audit.note(trail, subject_user_id=token.user_id)
            if token.used_time is None:
                raise Unauthenticated(
                    "refresh token expired or revoked", reason="REFRESH_TOKEN_EXPIRED"
                )
            revoked = await uow.sessions.revoke_session(
                token.session_id, now, "refresh_token_reuse"
            )
        if revoked:
            await self._revocations.revoke_sessions([token.session_id])
        audit.note(trail, reuse_detected=True)
        raise Unauthenticated(
            "refresh token was already used; the session has been revoked",
            reason="REFRESH_TOKEN_REUSED",
        )

    async def logout(
        self, principal: Principal, *, all_sessions: bool, trail: AuditTrail | None = None
    ) -> None:
        """End the caller's session (or all of them) and revoke the access token used."""
        now = self._clock.now()
        async with self._uow() as uow:
            if all_sessions:
                ended = await uow.sessions.revoke_user_sessions(principal.user_id, now, "logout")
            else:
                await uow.sessions.revoke_session(principal.session_id, now, "logout")
                ended = [principal.session_id]
            await audit.record(
                uow, trail, now, subject_user_id=principal.user_id, sessions_ended=len(ended)
            )
        await self._revocations.revoke_sessions(ended)
        await self._revocations.revoke_token(principal.token_id, principal.token_expires_at)
