"""ProxyService.WatchProxies: the current state, or the changes since an event the watcher
saw, then each change as it happens — as WatchTunnels does for tunnels (the live
subscription is opened before the log is read, so nothing committed in between is
missed, and an event both deliver is sent once)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from google.protobuf.message import Message
from tunnelplane.v1 import proxies_pb2

from server.api import proxy_convert as pc
from server.api.log_feed import LogFeed
from server.api.watch import LAST_EVENT_ID
from server.domain.common.errors import Aborted, InvalidArgument
from server.domain.common.ids import is_id
from server.domain.common.names import user_id_of
from server.domain.events.bus import SubscriptionOverflowError
from server.domain.events.model import Event
from server.domain.events.service import EventLog
from server.domain.proxies.fleet import ProxyFleet
from server.pipeline import Call

X = proxies_pb2
Kind = X.WatchProxiesResponse


@dataclass(frozen=True, slots=True)
class _Scope:
    owner: str
    proxy_id: str  # "" for all of the owner's proxies

    def covers(self, event: Event) -> bool:
        if not event.type.startswith("proxy."):
            return False
        name = f"users/{self.owner}/proxies/{self.proxy_id}"
        return event.subject == name if self.proxy_id else event.subject.startswith(name)


def _scope(name: str, caller_id: str) -> _Scope:
    parts = name.split("/")
    if len(parts) == 2:
        return _Scope(user_id_of(name, "name", caller_id), "")
    if len(parts) != 4 or parts[2] != "proxies" or not is_id(parts[3], "prx"):
        raise InvalidArgument.single(
            "name", "must look like users/{user} or users/{user}/proxies/{proxy}"
        )
    return _Scope(user_id_of("/".join(parts[:2]), "name", caller_id), parts[3])


class ProxyWatch:
    """Serves WatchProxies for :class:`server.api.proxies.ProxyApi`."""

    def __init__(
        self,
        fleet: ProxyFleet,
        events: EventLog,
        recheck: Callable[[Call], Awaitable[object]],
    ) -> None:
        self._fleet = fleet
        self._events = events
        self._recheck = recheck

    async def watch(self, request: X.WatchProxiesRequest, call: Call) -> Message:
        """The current state (or the changes since ``resume_after``), then each change,
        until the caller goes away."""
        assert call.principal is not None
        scope = _scope(request.name, call.principal.user_id)
        resume = call.header(LAST_EVENT_ID) or request.resume_after
        if resume and not is_id(resume, "evt"):
            raise InvalidArgument.single(
                "resume_after", "must be an event id, evt_... (also when sent as Last-Event-ID)"
            )
        subscription = self._fleet.bus.subscribe(scope.owner)  # before reading: miss nothing
        feed = LogFeed(self._events, subscription, scope.owner, scope.covers)
        try:
            await self._start(call, scope, feed, resume)
            while await feed.wait():
                await self._recheck(call)  # a revoked credential or suspended user ends it
                async for event in feed.new():
                    await self._send_change(call, scope, event)
        except SubscriptionOverflowError:
            raise Aborted("the watcher fell behind; watch again", reason="WATCH_OVERFLOW") from None
        finally:
            await subscription.close()
        return Kind()

    async def _start(self, call: Call, scope: _Scope, feed: LogFeed, resume: str) -> None:
        seen = await self._events.get(scope.owner, resume, fresh=True) if resume else None
        if seen is not None:
            feed.cursor = seen
            async for event in feed.new():
                await self._send_change(call, scope, event)
            if scope.proxy_id:
                await self._fleet.get(scope.owner, scope.proxy_id)  # NOT_FOUND if not there
        elif scope.proxy_id:
            await feed.start_at_newest()
            found = await self._fleet.get(scope.owner, scope.proxy_id)
            await call.send(Kind(kind=Kind.KIND_CURRENT, proxy=pc.proxy(found)))
        else:
            await feed.start_at_newest()
            token = ""
            while True:
                page = await self._fleet.list(
                    scope.owner, page_size=500, page_token=token, filter="", order_by=""
                )
                for p in page.items:
                    await call.send(Kind(kind=Kind.KIND_CURRENT, proxy=pc.proxy(p)))
                token = page.next_page_token
                if not token:
                    break
        await call.send(Kind(kind=Kind.KIND_SYNCED))

    async def _send_change(self, call: Call, scope: _Scope, event: Event) -> None:
        proxy_id = event.subject.rsplit("/", 1)[1]
        found = await self._fleet.get(scope.owner, proxy_id)
        await call.send(
            Kind(
                kind=Kind.KIND_CHANGED,
                proxy=pc.proxy(found),
                event_type=event.type,
                event_id=event.id,
            )
        )
