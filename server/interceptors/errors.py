"""Error mapping: domain errors pass through; anything else becomes a generic INTERNAL.

The traceback is logged with the request id; the client never sees ``str(exc)``.
"""

from __future__ import annotations

import logging

from google.protobuf.message import Message

from server.errors import DomainError, Internal
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
            except DomainError:
                raise
            except Exception:
                log.exception("unhandled error", extra={"method": name})
                raise Internal() from None

        return handle
