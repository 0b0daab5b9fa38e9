"""EventService."""

from __future__ import annotations

from tunnelplane.v1 import events_pb2

from server.api import tunnel_convert as tc
from server.api.users import caller_id
from server.domain.common.names import user_id_of
from server.domain.events.service import EventLog
from server.pipeline import Call


class EventApi:
    """Serves ``tunnelplane.v1.EventService``."""

    def __init__(self, log: EventLog) -> None:
        self._log = log

    async def ListEvents(
        self, request: events_pb2.ListEventsRequest, call: Call
    ) -> events_pb2.ListEventsResponse:
        user_id = user_id_of(request.parent, "parent", caller_id(call))
        page = await self._log.list(
            user_id,
            page_size=request.page_size,
            page_token=request.page_token,
            filter=request.filter,
        )
        return events_pb2.ListEventsResponse(
            events=[tc.event(e) for e in page.items], next_page_token=page.next_page_token
        )
