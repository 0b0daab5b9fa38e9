"""UserService."""

from __future__ import annotations

from google.api import httpbody_pb2
from google.protobuf import empty_pb2
from google.protobuf.message import Message
from tunnelplane.v1 import users_pb2

from server.api import convert
from server.domain.audit.search import AuditSearch
from server.domain.common.clock import Clock
from server.domain.common.names import user_id_of
from server.domain.identity.suspension import Suspensions
from server.domain.identity.tiers import TierCatalog
from server.domain.identity.users import UPDATABLE_PATHS, UserService
from server.domain.limits.service import QuotaService
from server.pipeline import Call


def caller_id(call: Call) -> str | None:
    """The authenticated caller's user id, if any."""
    return call.principal.user_id if call.principal else None


class UserApi:
    """Serves ``tunnelplane.v1.UserService``."""

    def __init__(
        self,
        users: UserService,
        suspensions: Suspensions,
        tiers: TierCatalog,
        quotas: QuotaService,
        clock: Clock,
        audit: AuditSearch,
    ) -> None:
        self._audit = audit
        self._users = users
        self._suspensions = suspensions
        self._tiers = tiers
        self._quotas = quotas
        self._clock = clock

    async def GetUser(self, request: users_pb2.GetUserRequest, call: Call) -> users_pb2.User:
        user_id = user_id_of(request.name, "name", caller_id(call))
        admin = call.principal is not None and call.principal.has("users.read")
        found = await self._users.get(user_id, show_deleted=request.show_deleted and admin)
        return convert.user(found)

    async def ListUsers(
        self, request: users_pb2.ListUsersRequest, call: Call
    ) -> users_pb2.ListUsersResponse:
        page = await self._users.list(
            page_size=request.page_size,
            page_token=request.page_token,
            filter=request.filter,
            order_by=request.order_by,
            show_deleted=request.show_deleted,
        )
        return users_pb2.ListUsersResponse(
            users=[convert.user(u) for u in page.items], next_page_token=page.next_page_token
        )

    async def UpdateUser(self, request: users_pb2.UpdateUserRequest, call: Call) -> users_pb2.User:
        user_id = user_id_of(request.user.name, "user.name", caller_id(call))
        paths = convert.mask_paths(request.update_mask, request.user, UPDATABLE_PATHS)
        updated = await self._users.update(
            user_id, convert.profile(request.user), paths, request.user.etag, call.audit
        )
        return convert.user(updated)

    async def DeleteUser(self, request: users_pb2.DeleteUserRequest, call: Call) -> users_pb2.User:
        user_id = user_id_of(request.name, "name", caller_id(call))
        deleted = await self._users.delete(
            user_id, etag=request.etag, purge=request.purge, trail=call.audit
        )
        return convert.user(deleted)

    async def UndeleteUser(
        self, request: users_pb2.UndeleteUserRequest, call: Call
    ) -> users_pb2.User:
        user_id = user_id_of(request.name, "name", caller_id(call))
        restored = await self._users.undelete(user_id, etag=request.etag, trail=call.audit)
        return convert.user(restored)

    async def SetUserRole(
        self, request: users_pb2.SetUserRoleRequest, call: Call
    ) -> users_pb2.User:
        user_id = user_id_of(request.name, "name", caller_id(call))
        role = convert.enum_in(convert.ROLES, request.role, "role")
        assert call.principal is not None
        changed = await self._users.set_role(
            call.principal,
            user_id,
            role,
            reason=request.reason,
            etag=request.etag,
            trail=call.audit,
        )
        return convert.user(changed)

    async def SuspendUser(
        self, request: users_pb2.SuspendUserRequest, call: Call
    ) -> users_pb2.User:
        user_id = user_id_of(request.name, "name", caller_id(call))
        assert call.principal is not None
        suspended = await self._suspensions.suspend(
            call.principal, user_id, request.reason, etag=request.etag, trail=call.audit
        )
        return convert.user(suspended)

    async def ReactivateUser(
        self, request: users_pb2.ReactivateUserRequest, call: Call
    ) -> users_pb2.User:
        user_id = user_id_of(request.name, "name", caller_id(call))
        assert call.principal is not None
        reactivated = await self._suspensions.reactivate(
            call.principal, user_id, request.reason, etag=request.etag, trail=call.audit
        )
        return convert.user(reactivated)

    async def ListTiers(
        self, request: users_pb2.ListTiersRequest, call: Call
    ) -> users_pb2.ListTiersResponse:
        return users_pb2.ListTiersResponse(
            tiers=[convert.tier_details(t) for t in self._tiers.all()]
        )

    async def GetTier(self, request: users_pb2.GetTierRequest, call: Call) -> users_pb2.TierDetails:
        return convert.tier_details(self._tiers.get(request.name))

    async def ChangeTier(self, request: users_pb2.ChangeTierRequest, call: Call) -> users_pb2.User:
        user_id = user_id_of(request.name, "name", caller_id(call))
        tier = convert.enum_in(convert.TIERS, request.tier, "tier")
        assert call.principal is not None
        changed = await self._users.change_tier(
            call.principal,
            user_id,
            tier,
            etag=request.etag,
            reason=request.reason,
            trail=call.audit,
        )
        return convert.user(changed)

    async def ListActivity(
        self, request: users_pb2.ListActivityRequest, call: Call
    ) -> users_pb2.ListActivityResponse:
        user_id = user_id_of(request.parent, "parent", caller_id(call))
        page = await self._users.list_activity(
            user_id,
            page_size=request.page_size,
            page_token=request.page_token,
            filter=request.filter,
        )
        return users_pb2.ListActivityResponse(
            entries=[convert.activity(e, user_id) for e in page.items],
            next_page_token=page.next_page_token,
        )

    async def ExportActivity(self, request: users_pb2.ExportActivityRequest, call: Call) -> Message:
        user_id = user_id_of(request.parent, "parent", caller_id(call))
        async for entry in await self._audit.export_activity(user_id, request.filter, call.audit):
            await call.send(convert.activity(entry, user_id))
        return users_pb2.ActivityEntry()

    async def UploadAvatar(
        self, request: users_pb2.UploadAvatarRequest, call: Call
    ) -> users_pb2.User:
        user_id = user_id_of(request.name, "name", caller_id(call), suffix="/avatar")
        body = request.avatar
        updated = await self._users.upload_avatar(user_id, body.content_type, body.data, call.audit)
        return convert.user(updated)

    async def GetAvatar(
        self, request: users_pb2.GetAvatarRequest, call: Call
    ) -> httpbody_pb2.HttpBody:
        user_id = user_id_of(request.name, "name", caller_id(call), suffix="/avatar")
        avatar = await self._users.get_avatar(user_id)
        call.set_header("cache-control", "private, max-age=300")
        return httpbody_pb2.HttpBody(content_type=avatar.content_type, data=avatar.data)

    async def GetUsage(self, request: users_pb2.GetUsageRequest, call: Call) -> users_pb2.Usage:
        user_id = user_id_of(request.name, "name", caller_id(call), suffix="/usage")
        user = await self._users.get(user_id)
        return convert.usage(await self._quotas.usage(user.id, user.tier))

    async def DeleteAvatar(
        self, request: users_pb2.DeleteAvatarRequest, call: Call
    ) -> empty_pb2.Empty:
        user_id = user_id_of(request.name, "name", caller_id(call), suffix="/avatar")
        await self._users.delete_avatar(user_id, call.audit)
        return empty_pb2.Empty()
