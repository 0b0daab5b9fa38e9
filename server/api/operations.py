"""OperationService: the long-running operations a caller started (AIP-151)."""

from __future__ import annotations

from google.rpc import status_pb2
from tunnelplane.v1 import operations_pb2

from server.api.convert import timestamp
from server.api.users import caller_id
from server.domain.common.clock import Clock
from server.domain.common.names import user_id_of
from server.domain.operations.model import Operation
from server.domain.operations.rules import operation_parts
from server.domain.operations.service import OperationService
from server.pipeline import Call

O = operations_pb2  # noqa: E741 - the module's short name, as P is elsewhere


def operation(o: Operation) -> O.Operation:
    """The API form of an operation."""
    message = O.Operation(
        name=o.name,
        done=o.done,
        metadata=O.OperationMetadata(
            kind=o.kind,
            target=o.target,
            processed=o.processed,
            total=o.total,
            create_time=timestamp(o.create_time),
            update_time=timestamp(o.update_time),
            end_time=timestamp(o.end_time),
        ),
    )
    if o.done and o.error_code:
        message.error.CopyFrom(status_pb2.Status(code=int(o.error_code), message=o.error_message))
    elif o.done and o.kind == "webhook.replay":
        queued = int((o.result or {}).get("queued", 0))
        message.replay_webhook_events.CopyFrom(O.ReplayWebhookEventsResponse(queued=queued))
    return message


class OperationApi:
    """Serves ``tunnelplane.v1.OperationService``."""

    def __init__(self, operations: OperationService, clock: Clock) -> None:
        self._operations = operations
        self._clock = clock

    async def CancelOperation(self, request: O.CancelOperationRequest, call: Call) -> O.Operation:
        owner, operation_id = operation_parts(request.name, "name", caller_id(call))
        cancelled = await self._operations.cancel(
            owner, operation_id, self._clock.now(), call.audit
        )
        return operation(cancelled)

    async def GetOperation(self, request: O.GetOperationRequest, call: Call) -> O.Operation:
        owner, operation_id = operation_parts(request.name, "name", caller_id(call))
        return operation(await self._operations.get(owner, operation_id))

    async def ListOperations(
        self, request: O.ListOperationsRequest, call: Call
    ) -> O.ListOperationsResponse:
        owner = user_id_of(request.parent, "parent", caller_id(call))
        page = await self._operations.list(
            owner, page_size=request.page_size, page_token=request.page_token, filter=request.filter
        )
        return O.ListOperationsResponse(
            operations=[operation(o) for o in page.items], next_page_token=page.next_page_token
        )
