"""Access log: one JSON line per call with method, code, duration, ids and peer."""

from __future__ import annotations

import time

from google.protobuf.message import Message

from server.domain.common.errors import Code
from server.logs import AccessLog
from server.pipeline import Call, Handler, MethodInfo, outcome_of


class AccessLogStage:
    """Logs each call once, when it ends."""

    def __init__(self, log: AccessLog) -> None:
        self._log = log

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
                if log.enabled():
                    principal = call.principal
                    log.write(
                        {
                            "method": name,
                            "code": code.name,
                            "duration_ms": round((time.perf_counter() - start) * 1000, 3),
                            "user_id": principal.user_id if principal else "",
                            "peer": call.peer,
                            "client_ip": call.client_ip,
                            "transport": call.transport,
                        }
                    )

        return handle
