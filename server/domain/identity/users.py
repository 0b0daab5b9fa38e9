"""Users: profiles and preferences, roles, tiers, deletion, avatars and activity."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import timedelta

from server.domain.audit import service as audit
from server.domain.audit.model import AuditEntry, AuditTrail
from server.domain.audit.rules import ACTIVITY_LIST_SPEC
from server.domain.common import fieldmask, validation
from server.domain.common.clock import Clock
from server.domain.common.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PreconditionViolation,
    Violations,
)
from server.domain.common.listing import FilterField, Lister, ListSpec, OrderKey, Page
from server.domain.events import service as events
from server.domain.events.ports import EventBus
from server.domain.identity.authentication import Revocations, SubjectDirectory
from server.domain.identity.model import Avatar, Principal, Profile, Role, Tier, User, UserState
from server.domain.identity.rules import etag_of, profile_of
from server.domain.identity.suspension import checked_reason
from server.domain.identity.tiers import SELF_SERVICE
from server.domain.unit_of_work import UnitOfWork, UnitOfWorkFactory

#: Mask paths UpdateUser accepts.
UPDATABLE_PATHS = frozenset(
    {
        "display_name",
        "preferences",
        "preferences.theme",
        "preferences.language",
        "preferences.time_zone",
        "preferences.notifications",
        "preferences.notifications.email",
        "preferences.notifications.security_alerts",
        "preferences.notifications.product_updates",
        "preferences.notifications.service_alerts",
    }
)

USER_LIST_SPEC = ListSpec(
    filter_fields={
        "email": FilterField("string"),
        "display_name": FilterField("string"),
        "tier": FilterField("enum", frozenset(t.value for t in Tier)),
        "role": FilterField("enum", frozenset(r.value for r in Role)),
        "state": FilterField("enum", frozenset(s.value for s in UserState)),
        "create_time": FilterField("timestamp"),
        "update_time": FilterField("timestamp"),
        "last_login_time": FilterField("timestamp"),
    },
    order_fields=frozenset({"email", "display_name", "create_time", "update_time"}),
    default_order=(OrderKey("create_time"),),
)

#: Image types accepted as avatars, with the bytes each must start with.
AVATAR_SIGNATURES: dict[str, tuple[bytes, ...]] = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
    "image/webp": (b"RIFF",),
}


@dataclass(frozen=True, slots=True)
class UserPolicy:
    """Limits from settings."""

    soft_delete_retention: timedelta
    avatar_max_bytes: int


class UserService:
    """Every user operation after authorization has allowed it."""

    def __init__(
        self,
        uow: UnitOfWorkFactory,
        subjects: SubjectDirectory,
        revocations: Revocations,
        lister: Lister,
        clock: Clock,
        policy: UserPolicy,
        bus: EventBus,
    ) -> None:
        self._bus = bus
        self._uow = uow
        self._subjects = subjects
        self._revocations = revocations
        self._lister = lister
        self._clock = clock
        self._policy = policy

    async def get(self, user_id: str, *, show_deleted: bool = False) -> User:
        """A user; a soft-deleted one only with ``show_deleted``."""
        async with self._uow(lag_tolerant=True) as uow:
            return await _load(uow, user_id, show_deleted=show_deleted)

    async def list(
        self,
        *,
        page_size: int,
        page_token: str,
        filter: str,  # noqa: A002 - the AIP field is called filter
        order_by: str,
        show_deleted: bool,
    ) -> Page[User]:
        """A page of users matching ``filter``."""
        query = self._lister.query(
            USER_LIST_SPEC,
            page_size=page_size,
            page_token=page_token,
            filter=filter,
            order_by=order_by,
            scope=f"deleted={show_deleted}",
        )
        async with self._uow(lag_tolerant=True) as uow:
            rows = await uow.users.list(query, include_deleted=show_deleted)
        return self._lister.page(query, rows, lambda u: _sort_key(u, query.order))

    async def update(
        self,
        user_id: str,
        requested: Profile,
        paths: tuple[str, ...],
        etag: str,
        trail: AuditTrail | None = None,
    ) -> User:
        """Apply the masked paths of ``requested`` to the user's profile."""
        paths = fieldmask.check_paths(paths, UPDATABLE_PATHS)
        async with self._uow() as uow:
            user = await _load(uow, user_id)
            _check_etag(user, etag, "user.etag")
            merged = fieldmask.merge(profile_of(user), requested, paths)
            clean = _validated_profile(merged)
            now = self._clock.now()
            if clean == profile_of(user):
                await audit.record(uow, trail, now)
                return user
            await audit.record(
                uow, trail, now, subject_user_id=user_id, resource=user.name, paths=list(paths)
            )
            return await uow.users.update(
                user_id,
                user.version,
                display_name=clean.display_name,
                preferences=clean.preferences,
                update_time=now,
            )

    async def delete(
        self, user_id: str, *, etag: str, purge: bool, trail: AuditTrail | None = None
    ) -> User:
        """Soft delete (restorable until ``purge_time``) or, with ``purge``, erase now. The
        call's own audit entry stays: it is recorded after the user's trail is erased."""
        now = self._clock.now()
        async with self._uow() as uow:
            user = await _load(uow, user_id, show_deleted=purge)
            _check_etag(user, etag, "etag")
            audit.note(trail, subject_user_id=user_id, resource=user.name, purge=purge)
            sessions = await uow.sessions.revoke_user_sessions(user_id, now, "account_deleted")
            if purge:
                await uow.audit.erase_user(user_id)
                await uow.users.delete(user_id)
                result = replace(user, state=UserState.DELETED, delete_time=now, purge_time=now)
            else:
                result = await uow.users.update(
                    user_id,
                    user.version,
                    state=UserState.DELETED,
                    delete_time=now,
                    purge_time=now + self._policy.soft_delete_retention,
                    update_time=now,
                )
                # A purged user's events go with them; a soft-deleted one's stay.
                await events.record(
                    uow,
                    self._bus,
                    self._clock,
                    "user.deleted",
                    subject=user.name,
                    user_id=user_id,
                    actor=audit.actor(trail),
                    payload={
                        "name": user.name,
                        "purge_time": result.purge_time.isoformat() if result.purge_time else "",
                    },
                )
            self._after_identity_change(uow, user_id)
            await audit.record(uow, trail, now)
        await self._revocations.revoke_sessions(sessions)
        return result

    async def undelete(self, user_id: str, *, etag: str, trail: AuditTrail | None = None) -> User:
        """Restore a soft-deleted user."""
        async with self._uow() as uow:
            user = await _load(uow, user_id, show_deleted=True)
            _check_etag(user, etag, "etag")
            if user.state != UserState.DELETED:
                raise FailedPrecondition(
                    "user is not deleted",
                    [PreconditionViolation("STATE", user.name, f"state is {user.state.value}")],
                    reason="NOT_DELETED",
                )
            now = self._clock.now()
            await audit.record(uow, trail, now, subject_user_id=user_id, resource=user.name)
            restored = await uow.users.update(
                user_id,
                user.version,
                state=UserState.ACTIVE,
                delete_time=None,
                purge_time=None,
                update_time=now,
            )
            self._after_identity_change(uow, user_id)
        return restored

    async def set_role(
        self,
        actor: Principal,
        user_id: str,
        role: Role,
        *,
        reason: str,
        etag: str,
        trail: AuditTrail | None = None,
    ) -> User:
        """Give a user another role, with a reason. Nobody changes their own role."""
        why = checked_reason(reason)
        if user_id == actor.user_id:
            raise PermissionDenied("you cannot change your own role", reason="SELF_ROLE_CHANGE")
        async with self._uow() as uow:
            user = await _load(uow, user_id)
            _check_etag(user, etag, "etag")
            now = self._clock.now()
            await audit.record(
                uow,
                trail,
                now,
                subject_user_id=user_id,
                resource=user.name,
                role_from=user.role.value,
                role_to=role.value,
                reason=why,
            )
            if user.role == role:
                return user
            updated = await uow.users.update(user_id, user.version, role=role, update_time=now)
            self._after_identity_change(uow, user_id)
            await self._changed(uow, "user.role_changed", actor, user, user.role, role, why)
        return updated

    async def promote(self, email: str, role: Role, trail: AuditTrail | None = None) -> User:
        """Give the user with ``email`` a role (operator bootstrap from the command line)."""
        async with self._uow() as uow:
            credentials = await uow.users.get_credentials(email.strip().lower())
            if credentials is None:
                raise NotFound("user", email)
            user = credentials.user
            now = self._clock.now()
            await audit.record(
                uow, trail, now, subject_user_id=user.id, resource=user.name, role_to=role.value
            )
            if user.role == role:
                return user
            updated = await uow.users.update(user.id, user.version, role=role, update_time=now)
            self._after_identity_change(uow, user.id)
        return updated

    async def change_tier(
        self,
        actor: Principal,
        user_id: str,
        tier: Tier,
        *,
        etag: str,
        reason: str = "",
        trail: AuditTrail | None = None,
    ) -> User:
        """Move a user to ``tier``. Self-service covers free and premium for oneself only;
        an administrator moving someone else gives a reason."""
        why = checked_reason(reason) if reason or user_id != actor.user_id else ""
        as_billing_admin = actor.has("billing.write")
        if not as_billing_admin and (user_id != actor.user_id or tier not in SELF_SERVICE):
            raise PermissionDenied(
                f"moving to {tier.value} needs billing.write", reason="TIER_NOT_SELF_SERVICE"
            )
        async with self._uow() as uow:
            user = await _load(uow, user_id)
            _check_etag(user, etag, "etag")
            now = self._clock.now()
            await audit.record(
                uow,
                trail,
                now,
                subject_user_id=user_id,
                resource=user.name,
                tier_from=user.tier.value,
                tier_to=tier.value,
                reason=why,
            )
            if user.tier == tier:
                return user
            updated = await uow.users.update(user_id, user.version, tier=tier, update_time=now)
            self._after_identity_change(uow, user_id)
            await self._changed(uow, "user.tier_changed", actor, user, user.tier, tier, why)
        return updated

    async def list_activity(
        self,
        user_id: str,
        *,
        page_size: int,
        page_token: str,
        filter: str,  # noqa: A002 - the AIP field is called filter
    ) -> Page[AuditEntry]:
        """A page of the user's activity, newest first."""
        query = self._lister.query(
            ACTIVITY_LIST_SPEC,
            page_size=page_size,
            page_token=page_token,
            filter=filter,
            scope=user_id,
        )
        async with self._uow(lag_tolerant=True) as uow:
            await _load(uow, user_id, show_deleted=True)
            rows = await uow.audit.list_for_user(user_id, query)
        return self._lister.page(query, rows, lambda e: (e.time, e.id))

    async def upload_avatar(
        self, user_id: str, content_type: str, data: bytes, trail: AuditTrail | None = None
    ) -> User:
        """Store a new avatar after checking its size and that its bytes match its type."""
        content_type = content_type.split(";", maxsplit=1)[0].strip().lower()
        _check_avatar(content_type, data, self._policy.avatar_max_bytes)
        now = self._clock.now()
        async with self._uow() as uow:
            user = await _load(uow, user_id)
            await uow.avatars.put(Avatar(user_id, content_type, data, now))
            await audit.record(
                uow,
                trail,
                now,
                subject_user_id=user_id,
                resource=f"{user.name}/avatar",
                content_type=content_type,
                size=len(data),
            )
            return await uow.users.update(user_id, None, has_avatar=True, update_time=now)

    async def get_avatar(self, user_id: str) -> Avatar:
        """The user's avatar."""
        async with self._uow(lag_tolerant=True) as uow:
            await _load(uow, user_id)
            avatar = await uow.avatars.get(user_id)
        if avatar is None:
            raise NotFound("avatar", f"users/{user_id}/avatar")
        return avatar

    async def delete_avatar(self, user_id: str, trail: AuditTrail | None = None) -> None:
        """Remove the user's avatar."""
        async with self._uow() as uow:
            user = await _load(uow, user_id)
            if not await uow.avatars.delete(user_id):
                raise NotFound("avatar", f"{user.name}/avatar")
            now = self._clock.now()
            await audit.record(
                uow, trail, now, subject_user_id=user_id, resource=f"{user.name}/avatar"
            )
            await uow.users.update(user_id, None, has_avatar=False, update_time=now)

    async def purge_expired(self, limit: int = 100) -> int:
        """Erase soft-deleted users whose retention has ended; returns how many."""
        async with self._uow() as uow:
            due = await uow.users.due_for_purge(self._clock.now(), limit)
            for user_id in due:
                await uow.audit.erase_user(user_id)
                await uow.users.delete(user_id)
                self._after_identity_change(uow, user_id)
        return len(due)

    async def _changed(
        self,
        uow: UnitOfWork,
        type_: str,
        actor: Principal,
        user: User,
        before: Role | Tier,
        after: Role | Tier,
        reason: str,
    ) -> None:
        """The event of a role or tier change: from, to and why."""
        await events.record(
            uow,
            self._bus,
            self._clock,
            type_,
            subject=user.name,
            user_id=user.id,
            actor=f"users/{actor.user_id}",
            payload={"name": user.name, "from": before.value, "to": after.value, "reason": reason},
        )

    def _after_identity_change(self, uow: UnitOfWork, user_id: str) -> None:
        uow.after_commit(lambda: self._subjects.invalidate(user_id))


async def _load(uow: UnitOfWork, user_id: str, *, show_deleted: bool = False) -> User:
    user = await uow.users.get(user_id)
    if user is None or (user.state == UserState.DELETED and not show_deleted):
        raise NotFound("user", f"users/{user_id}")
    return user


def _check_etag(user: User, etag: str, field: str) -> None:
    if etag and etag != etag_of(user):
        raise Aborted(
            "the user changed since it was read; fetch it again",
            reason="ETAG_MISMATCH",
            metadata={"field": field},
        )


def _validated_profile(profile: Profile) -> Profile:
    violations = Violations()
    name = validation.display_name(profile.display_name, "user.display_name", violations)
    prefs = profile.preferences
    validation.language(prefs.language, "user.preferences.language", violations)
    validation.time_zone(prefs.time_zone, "user.preferences.time_zone", violations)
    violations.raise_if_any()
    return replace(profile, display_name=name)


def _check_avatar(content_type: str, data: bytes, max_bytes: int) -> None:
    signatures = AVATAR_SIGNATURES.get(content_type)
    if signatures is None:
        allowed = ", ".join(sorted(AVATAR_SIGNATURES))
        raise InvalidArgument.single("avatar.content_type", f"must be one of {allowed}")
    if not data:
        raise InvalidArgument.single("avatar.data", "is empty", "REQUIRED")
    if len(data) > max_bytes:
        raise InvalidArgument.single(
            "avatar.data", f"is larger than {max_bytes} bytes", "TOO_LARGE"
        )
    webp = content_type != "image/webp" or data[8:12] == b"WEBP"
    if not data.startswith(signatures) or not webp:
        raise InvalidArgument.single("avatar.data", f"is not a {content_type} image")


def _sort_key(user: User, order: tuple[OrderKey, ...]) -> tuple[object, ...]:
    return (*(getattr(user, key.field) for key in order), user.id)
