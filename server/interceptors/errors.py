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
from server.pipeline import Call, Handler, MethodInfo


class ErrorStage:
    """Innermost stage: nothing unexpected reaches a client as anything but INTERNAL."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger

    def wrap(self, method: MethodInfo, handler: Handler) -> Handler:
        log = self._log
        name = method.full_name

        async def handle(request: Message, call: Call) -> Message:
            try:
                return await handler(request, call)
            except DomainError as exc:
                _retry_after(exc, call)
                raise
            except Exception:
                log.exception("unhandled error", extra={"method": name})
                raise Internal() from None

        return handle


def _retry_after(error: DomainError, call: Call) -> None:
    seconds = getattr(error, "retry_after", None)
    if seconds is None or any(key == "retry-after" for key, _ in call.trailers):
        return
    call.trailers.append(("retry-after", str(max(1, math.ceil(seconds)))))
