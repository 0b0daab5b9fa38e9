"""Request context: take or make the request id (sent back in initial metadata) and the
trace id that every log line of the call carries."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Sequence

from google.protobuf.message import Message

from server.domain.common.addresses import Network
from server.domain.limits.rules import client_address
from server.logs import request_id_var, trace_id_var
from server.pipeline import Call, Handler, MethodInfo

#: Set by the HTTP gateway when it made the request id up (the client sent none).
GENERATED_MARK = "x-request-id-generated"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
#: W3C trace context: ``version-traceid-parentid-flags``, lower-case hex.
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_NO_TRACE = "0" * 32


def trace_id_of(traceparent: str) -> str:
    """The caller's trace id from a W3C ``traceparent``, or a new random one: every call
    has a trace id for its log lines, whether or not spans are exported."""
    found = _TRACEPARENT.match(traceparent)
    if found is not None and found[1] != _NO_TRACE:
        return found[1]
    return os.urandom(16).hex()


class RequestContextStage:
    """Binds ``x-request-id`` (a caller's if well-formed, else a new one), the trace id (the
    caller's ``traceparent``, else a new one; the tracing stage may replace it with its
    span's) and the client address (the peer, or the ``X-Forwarded-For`` hop a trusted
    proxy vouches for). Both ids stay bound until the call ends, so the access log line
    written on the way out carries them too.

    A request id the server made is returned in the initial metadata. One the caller sent
    is not echoed: the caller has it, and on grpc.aio initial metadata costs a separate
    batch operation per call (measured: about a tenth of a GetUser's throughput).
    """

    def __init__(self, trusted_proxies: Sequence[Network] = ()) -> None:
        self._trusted = tuple(trusted_proxies)

    def wrap(self, method: MethodInfo, handler: Handler) -> Handler:
        trusted = self._trusted

        async def handle(request: Message, call: Call) -> Message:
            if trusted:
                call.client_ip = client_address(call.peer, call.header("x-forwarded-for"), trusted)
            given = call.header("x-request-id")
            if _SAFE_ID.match(given):
                request_id = given
                call.request_id_given = call.header(GENERATED_MARK) != "1"
            else:
                request_id = uuid.uuid4().hex
                call.set_header("x-request-id", request_id)
            call.request_id = request_id
            token = request_id_var.set(request_id)
            trace_token = trace_id_var.set(trace_id_of(call.header("traceparent")))
            try:
                return await handler(request, call)
            finally:
                trace_id_var.reset(trace_token)
                request_id_var.reset(token)

        return handle
