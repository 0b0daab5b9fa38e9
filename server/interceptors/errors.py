"""Error mapping: domain errors pass through; anything else becomes a generic INTERNAL.

The traceback is logged with the request id; the client never sees ``str(exc)``. An error
that says when to retry (``RetryInfo``) also says it as ``retry-after`` metadata, which
HTTP clients get as the ``Retry-After`` header.
"""

from __future__ import annotations

import logging
import math

from google.protobuf.message import Message

from server.domain.common.errors import DomainError, Internal
from server.errortracking import ErrorReporter, NoReporter
from server.logs import trace_id_var
from server.pipeline import Call, Handler, MethodInfo


class ErrorStage:
    """Innermost stage: nothing unexpected reaches a client as anything but INTERNAL, and
    every such error is reported (:mod:`server.errortracking`) with the call's tags."""

    def __init__(self, logger: logging.Logger, reporter: ErrorReporter | None = None) -> None:
        self._log = logger
        self._reporter = reporter or NoReporter()

    def wrap(self, method: MethodInfo, handler: Handler) -> Handler:
        log, reporter = self._log, self._reporter
        name = method.full_name

        async def handle(request: Message, call: Call) -> Message:
            try:
                return await handler(request, call)
            except DomainError as exc:
                _retry_after(exc, call)
                raise
            except Exception as exc:
                log.exception("unhandled error", extra={"method": name})
                reporter.capture(exc, error_tags(call))
                raise Internal() from None

        if not reporter.traces:  # no per-call transaction unless calls are sampled
            return handle

        async def traced(request: Message, call: Call) -> Message:
            with reporter.transaction(name):
                return await handle(request, call)

        return traced


def error_tags(call: Call) -> dict[str, str]:
    """What an error report says about its call: ids to find its logs and spans, the
    method, the transport and the kind of caller (never who)."""
    principal = call.principal
    return {
        "request_id": call.request_id,
        "trace_id": trace_id_var.get(),
        "method": call.method.full_name,
        "transport": call.transport,
        "principal": principal.credential.value if principal is not None else "anonymous",
    }


def _retry_after(error: DomainError, call: Call) -> None:
    """The error's own ``retry-after``, replacing any an earlier stage set: an error
    response's header always says what its ``RetryInfo`` says."""
    seconds = getattr(error, "retry_after", None)
    if seconds is None:
        return
    call.trailers[:] = [(key, value) for key, value in call.trailers if key != "retry-after"]
    call.trailers.append(("retry-after", str(max(1, math.ceil(seconds)))))
