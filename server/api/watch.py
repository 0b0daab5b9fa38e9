"""TunnelService.WatchTunnels: the current state, or the changes since an event the watcher
saw, then each change as it happens.

Resuming reads the event log (``resume_after``, or an SSE client's ``Last-Event-ID``, which
the gateway forwards as ``grpcgateway-last-event-id``). The live subscription is opened
before the log is read, so nothing committed in between is missed, and an event that both
the log and the subscription deliver is sent once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from google.protobuf.message import Message
from tunnelplane.v1 import tunnels_pb2

from server.api import tunnel_convert as tc
from server.api.log_feed import LogFeed
from server.domain.common.errors import (
    Aborted,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from server.domain.common.ids import is_id
from server.domain.common.names import user_id_of
from server.domain.events.bus import SubscriptionOverflowError
from server.domain.events.model import Event
from server.domain.events.service import EventLog
from server.domain.identity.rules import needs_share_lookup
from server.domain.tunnels.model import Tunnel
from server.domain.tunnels.rules import tunnel_parts
from server.domain.tunnels.service import TunnelService
from server.domain.tunnels.sharing import ShareService
from server.pipeline import Call

P = tunnels_pb2
Kind = P.WatchTunnelsResponse
#: How an SSE client's ``Last-Event-ID`` reaches the server through the gateway.
LAST_EVENT_ID = "grpcgateway-last-event-id"


@dataclass(frozen=True, slots=True)
class _Scope:
    """What one watch covers."""

    owner: str
    tunnel_id: str  # "" for all of the owner's tunnels

    @property
    def name(self) -> str:
        """The watched tunnel's canonical name (``me`` resolved), or the owner's."""
        tail = f"/tunnels/{self.tunnel_id}" if self.tunnel_id else ""
        return f"users/{self.owner}{tail}"

    def covers(self, event: Event) -> bool:
        if not event.type.startswith("tunnel."):
            return False
        return not self.tunnel_id or event.subject == self.name


def resume_point(request: P.WatchTunnelsRequest, call: Call) -> str:
    """The event to resume after ("" for none): ``Last-Event-ID`` (newer, sent by a
    reconnecting browser) wins over the request field."""
    value = call.header(LAST_EVENT_ID) or request.resume_after
    if value and not is_id(value, "evt"):
        raise InvalidArgument.single(
            "resume_after", "must be an event id, evt_... (also when sent as Last-Event-ID)"
        )
    return value


class TunnelWatch:
    """Serves WatchTunnels for :class:`server.api.tunnels.TunnelApi`."""

    def __init__(
        self,
        tunnels: TunnelService,
        shares: ShareService,
        events: EventLog,
        recheck: Callable[[Call], Awaitable[object]],
        out: Callable[[Tunnel], P.Tunnel],
    ) -> None:
        self._tunnels = tunnels
        self._shares = shares
        self._events = events
        self._recheck = recheck
        self._out = out

    async def watch(self, request: P.WatchTunnelsRequest, call: Call) -> Message:
        """The current state (or the changes since ``resume_after``), then each change,
        until the caller goes away."""
        principal = call.principal
        assert principal is not None
        scope = _scope(request.name, principal.user_id)
        resume = resume_point(request, call)
        # Someone watching through a share keeps seeing changes only while the share lasts.
        by_share = needs_share_lookup(call.method.policy.rule, principal, scope.owner)
        subscription = self._tunnels.bus.subscribe(scope.owner)  # before reading: miss nothing
        feed = LogFeed(self._events, subscription, scope.owner, scope.covers)
        try:
            if not await self._start(call, scope, feed, resume):
                return P.WatchTunnelsResponse()
            while await feed.wait():
                await self._recheck(call)  # a revoked credential or suspended user ends it
                async for event in feed.new():
                    if by_share and not await self._shares.share_role(
                        scope.name, principal.user_id
                    ):
                        raise PermissionDenied("the share has ended", reason="SHARE_ENDED")
                    if not await self._send_change(call, scope.owner, event) and scope.tunnel_id:
                        return P.WatchTunnelsResponse()
        except SubscriptionOverflowError:
            raise Aborted("the watcher fell behind; watch again", reason="WATCH_OVERFLOW") from None
        finally:
            await subscription.close()
        return P.WatchTunnelsResponse()

    async def _start(self, call: Call, scope: _Scope, feed: LogFeed, resume: str) -> bool:
        """Send the current state, or the changes since ``resume``, then ``SYNCED``; False
        if the watched tunnel's deletion was among the changes."""
        seen = await self._events.get(scope.owner, resume, fresh=True) if resume else None
        if seen is None:
            await feed.start_at_newest()
            await self._send_current(call, scope)
        else:
            feed.cursor = seen
            async for event in feed.new():
                if not await self._send_change(call, scope.owner, event) and scope.tunnel_id:
                    return False
            if scope.tunnel_id:
                await self._tunnels.get(scope.owner, scope.tunnel_id)  # NOT_FOUND if gone
        await call.send(Kind(kind=Kind.KIND_SYNCED))
        return True

    async def _send_current(self, call: Call, scope: _Scope) -> None:
        if scope.tunnel_id:
            found = await self._tunnels.get(scope.owner, scope.tunnel_id)
            await call.send(Kind(kind=Kind.KIND_CURRENT, tunnel=self._out(found)))
        else:
            token = ""
            while True:
                page = await self._tunnels.list(
                    scope.owner, page_size=500, page_token=token, filter="", order_by=""
                )
                for t in page.items:
                    await call.send(Kind(kind=Kind.KIND_CURRENT, tunnel=self._out(t)))
                token = page.next_page_token
                if not token:
                    break

    async def _send_change(self, call: Call, owner: str, event: Event) -> bool:
        """Send one change; False once the tunnel is gone."""
        ids = {"event_type": event.type, "event_id": event.id}
        if event.type == "tunnel.deleted":
            await call.send(Kind(kind=Kind.KIND_DELETED, tunnel=tc.deleted_tunnel(event), **ids))
            return False
        _, tunnel_id = tunnel_parts(event.subject, "subject", owner)
        try:
            found = await self._tunnels.get(owner, tunnel_id)
        except NotFound:
            return True  # deleted since; its own event follows
        await call.send(Kind(kind=Kind.KIND_CHANGED, tunnel=self._out(found), **ids))
        return True


def _scope(name: str, caller_id: str) -> _Scope:
    if name.count("/") > 1:
        return _Scope(*tunnel_parts(name, "name", caller_id))
    return _Scope(user_id_of(name, "name", caller_id), "")
