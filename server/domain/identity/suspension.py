"""Suspending and reactivating users: an administrator's stop that takes effect at once on
every replica, and its undoing.

A suspended user's state is ``suspended``: every credential check reads the user's state
(through the subject cache, which the change clears before anyone is told of it), so their
access tokens, API keys and agent keys stop working at once wherever they are presented;
their sessions are revoked (refresh tokens end: they sign in again once reactivated). The
``user.suspended`` event, published after the cache is cleared, ends their open streams:
watch streams check the caller again when an event about the user wakes them, and agent
streams end on it.
"""

from __future__ import annotations

from server.domain.audit import service as audit
from server.domain.audit.model import AuditTrail
from server.domain.common.clock import Clock
from server.domain.common.errors import Aborted, InvalidArgument, NotFound, PermissionDenied
from server.domain.events import service as events
from server.domain.events.ports import EventBus
from server.domain.identity.authentication import Revocations, SubjectDirectory
from server.domain.identity.model import Principal, User, UserState
from server.domain.identity.rules import etag_of
from server.domain.unit_of_work import UnitOfWorkFactory

#: The longest reason accepted.
MAX_REASON = 500
#: Event types that change whether a user's credentials work: streams check again.
ACCESS_EVENTS = frozenset({"user.suspended", "user.deleted"})


def checked_reason(reason: str) -> str:
    """The reason, trimmed; INVALID_ARGUMENT naming ``reason`` if empty or too long."""
    text = reason.strip()
    if not text:
        raise InvalidArgument.single("reason", "is required", "REQUIRED")
    if len(text) > MAX_REASON or any(c < " " and c not in "\t" for c in text):
        raise InvalidArgument.single(
            "reason", f"must be at most {MAX_REASON} characters, without control characters"
        )
    return text


class Suspensions:
    """SuspendUser and ReactivateUser, after authorization has allowed them."""

    def __init__(
        self,
        uow: UnitOfWorkFactory,
        subjects: SubjectDirectory,
        revocations: Revocations,
        clock: Clock,
        bus: EventBus,
    ) -> None:
        self._uow = uow
        self._subjects = subjects
        self._revocations = revocations
        self._clock = clock
        self._bus = bus

    async def suspend(
        self,
        actor: Principal,
        user_id: str,
        reason: str,
        *,
        etag: str,
        trail: AuditTrail | None = None,
    ) -> User:
        """Suspend ``user_id`` (nothing changes if it is suspended already)."""
        text = checked_reason(reason)
        if user_id == actor.user_id:
            raise PermissionDenied("you cannot suspend yourself", reason="SELF_SUSPENSION")
        return await self._move(
            actor, user_id, text, etag, trail, to=UserState.SUSPENDED, event="user.suspended"
        )

    async def reactivate(
        self,
        actor: Principal,
        user_id: str,
        reason: str,
        *,
        etag: str,
        trail: AuditTrail | None = None,
    ) -> User:
        """Reactivate ``user_id`` (nothing changes if it is active)."""
        text = checked_reason(reason)
        return await self._move(
            actor, user_id, text, etag, trail, to=UserState.ACTIVE, event="user.reactivated"
        )

    async def _move(
        self,
        actor: Principal,
        user_id: str,
        reason: str,
        etag: str,
        trail: AuditTrail | None,
        *,
        to: UserState,
        event: str,
    ) -> User:
        now = self._clock.now()
        sessions: list[str] = []
        async with self._uow() as uow:
            user = await uow.users.get(user_id)
            if user is None or user.state == UserState.DELETED:
                raise NotFound("user", f"users/{user_id}")
            if etag and etag != etag_of(user):
                raise Aborted(
                    "the user changed since it was read; fetch it again",
                    reason="ETAG_MISMATCH",
                    metadata={"field": "etag"},
                )
            audit.note(
                trail,
                subject_user_id=user_id,
                resource=user.name,
                reason=reason,
                state_from=user.state.value,
                state_to=to.value,
            )
            await audit.record(uow, trail, now)
            if user.state == to:
                return user
            updated = await uow.users.update(user_id, user.version, state=to, update_time=now)
            if to == UserState.SUSPENDED:
                sessions = await uow.sessions.revoke_user_sessions(user_id, now, "suspended")
            # The cache is cleared before the event goes out: a stream that checks its
            # caller again on hearing it must find the new state.
            uow.after_commit(lambda: self._subjects.invalidate(user_id))
            await events.record(
                uow,
                self._bus,
                self._clock,
                event,
                subject=user.name,
                user_id=user_id,
                actor=f"users/{actor.user_id}",
                payload={"name": user.name, "reason": reason},
            )
        await self._revocations.revoke_sessions(sessions)
        return updated
