"""Identity: accounts and sign-in, users, access tokens, API keys, the credentials every
call presents, and tiers; soft-deleted users are purged in the background."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from server.compose.events import EventsArea
from server.compose.infrastructure import Infrastructure
from server.domain.identity.accounts import AccountService, SessionPolicy
from server.domain.identity.api_keys import ApiKeyService
from server.domain.identity.authentication import (
    LOCAL_SUBJECT_CACHE_TTL,
    SUBJECT_CACHE_TTL,
    Authenticator,
    Revocations,
    SubjectDirectory,
)
from server.domain.identity.passwords import PasswordHasher
from server.domain.identity.suspension import Suspensions
from server.domain.identity.throttle import LoginThrottle, ThrottlePolicy
from server.domain.identity.tiers import TierCatalog
from server.domain.identity.tokens import TokenService
from server.domain.identity.users import UserPolicy, UserService
from server.interceptors.auth import CallCredentials
from server.settings import Settings
from server.storage.kv import ResilientStore
from server.workers.purge import purge_loop
from server.workers.supervisor import Loop


@dataclass
class IdentityArea:
    """Who callers are and what they may hold."""

    tokens: TokenService
    hasher: PasswordHasher
    api_keys: ApiKeyService
    authenticator: Authenticator
    credentials: CallCredentials
    accounts: AccountService
    users: UserService
    suspensions: Suspensions
    tiers: TierCatalog
    #: The sign-in throttle's rules, under keys of their own, for tunnels' basic passwords.
    basic_throttle: LoginThrottle

    def loops(self) -> Sequence[Loop]:
        """The purge of soft-deleted users past retention."""
        return [purge_loop(self.users, logging.getLogger("tunnelplane.users"))]

    async def aclose(self) -> None:
        """Stop the password hashing threads."""
        self.hasher.close()


def build(infra: Infrastructure, events: EventsArea) -> IdentityArea:
    """Identity over ``infra``; its use cases publish on ``events``' bus."""
    settings, db, kv, clock = infra.settings, infra.db, infra.kv, infra.clock
    tokens = TokenService(
        infra.keys.jwt_keys,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        ttl=settings.access_token_ttl,
        clock=clock,
    )
    revocations = Revocations(kv, clock, settings.access_token_ttl)
    # In-process state (no Redis): other processes cannot invalidate it; keep it short.
    shared = isinstance(kv, ResilientStore)
    subjects = SubjectDirectory(
        db, kv, ttl=SUBJECT_CACHE_TTL if shared else LOCAL_SUBJECT_CACHE_TTL
    )
    api_keys = ApiKeyService(
        db,
        kv,
        infra.lister,
        clock,
        default_overlap=timedelta(seconds=settings.api_key_rotation_overlap),
    )
    authenticator = Authenticator(
        tokens,
        subjects,
        revocations,
        api_keys,
        kv,
        db,
        clock,
        # A stream's session is read at most once per re-check interval.
        session_cache_ttl=settings.stream_recheck_interval,
    )
    hasher = _hasher(settings)
    accounts = AccountService(
        db,
        hasher,
        tokens,
        _throttle(infra),
        revocations,
        clock,
        SessionPolicy(
            absolute_ttl=timedelta(seconds=settings.refresh_token_ttl),
            idle_ttl=timedelta(seconds=settings.refresh_token_idle_ttl),
        ),
        events.bus,
    )
    users = UserService(
        db,
        subjects,
        revocations,
        infra.lister,
        clock,
        UserPolicy(
            soft_delete_retention=timedelta(seconds=settings.soft_delete_retention),
            avatar_max_bytes=settings.avatar_max_bytes,
        ),
        events.bus,
    )
    return IdentityArea(
        tokens,
        hasher,
        api_keys,
        authenticator,
        CallCredentials(authenticator),
        accounts,
        users,
        Suspensions(db, subjects, revocations, clock, events.bus),
        TierCatalog(settings.tiers),
        _throttle(infra, prefix="basic"),
    )


def _hasher(settings: Settings) -> PasswordHasher:
    return PasswordHasher(
        settings.argon2_time_cost,
        settings.argon2_memory_kib,
        settings.argon2_parallelism,
        max_concurrent=settings.password_hash_concurrency or os.cpu_count() or 1,
    )


def _throttle(infra: Infrastructure, prefix: str = "login") -> LoginThrottle:
    settings = infra.settings
    policy = ThrottlePolicy(
        window=settings.login_window,
        slowdown_after=settings.login_slowdown_after,
        lock_after=settings.login_lock_after,
        ip_lock_after=settings.login_ip_lock_after,
        lock_duration=settings.login_lock_duration,
    )
    return LoginThrottle(infra.kv, policy, infra.clock, prefix=prefix)
