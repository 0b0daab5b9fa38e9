"""Access log: one JSON line per call with method, code, duration, ids and peer."""

from __future__ import annotations

import logging
import time

from google.protobuf.message import Message

from server.errors import Code
from server.pipeline import Call, Handler, MethodInfo, outcome_of


class AccessLogStage:
    """Logs each call once, when it ends."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger

    def wrap(self, method: MethodInfo, handler: Handler) -> Handler:
        log = self._log
        name = method.full_name

        async def handle(request: Message, call: Call) -> Message:
            start = time.perf_counter()
            code = Code.OK
            try:
                return await handler(request, call)
            except BaseException as exc:
                code = outcome_of(exc)
                raise
            finally:
                if log.isEnabledFor(logging.INFO):
                    principal = call.principal
                    log.info(
                        "call",
                        extra={
                            "method": name,
                            "code": code.name,
                            "duration_ms": round((time.perf_counter() - start) * 1000, 3),
                            "user_id": principal.user_id if principal else "",
                            "peer": call.peer,
                            "transport": call.transport,
                        },
                    )

        return handle
