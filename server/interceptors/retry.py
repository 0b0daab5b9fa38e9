"""A safe call whose database connection failed runs once more.

After a failover, or when a pooled connection died with its server, the first unit of
work on a dead connection fails; the pool replaces the connection (``pool_pre_ping``, and
libpq finds the writable host of a multi-host URL), so a second run usually succeeds. Only
safe methods (every HTTP binding a GET: they change nothing) run again, only unary ones
(a stream may have sent part of its answer), once, and only within the call's deadline
(the deadline stage is outside this one). A write is never run again here: the caller
retries it with its request id, which makes the write idempotent."""

from __future__ import annotations

from google.protobuf.message import Message
from prometheus_client import CollectorRegistry, Counter

from server.domain.common.errors import DatabaseUnavailable
from server.pipeline import Call, Handler, MethodInfo


class RetryStage:
    """Runs a safe unary handler again once after a :class:`DatabaseUnavailable`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._retries = Counter(
            "tunnelplane_grpc_server_retries_total",
            "Safe calls run a second time after their database connection failed, by outcome.",
            ["grpc_method", "outcome"],
            registry=registry,
        )

    def wrap(self, method: MethodInfo, handler: Handler) -> Handler:
        if method.grpc_type != "unary" or not method.policy.safe:
            return handler
        succeeded = self._retries.labels(method.name, "succeeded")
        failed = self._retries.labels(method.name, "failed")

        async def handle(request: Message, call: Call) -> Message:
            headers, trailers = len(call.response_headers), len(call.trailers)
            try:
                return await handler(request, call)
            except DatabaseUnavailable:
                pass
            # What the first run added goes; what the stages outside added stays.
            del call.response_headers[headers:], call.trailers[trailers:]
            try:
                response = await handler(request, call)
            except DatabaseUnavailable:
                failed.inc()
                raise
            succeeded.inc()
            return response

        return handle
