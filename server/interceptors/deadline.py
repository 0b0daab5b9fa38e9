"""Deadline: the caller's, or a default one when the caller set none."""

from __future__ import annotations

import asyncio

from google.protobuf.message import Message

from server.domain.common.errors import DeadlineExceeded
from server.pipeline import Call, Handler, MethodInfo


class DeadlineStage:
    """Cancels the handler at the deadline and reports ``DEADLINE_EXCEEDED``."""

    def __init__(self, default_seconds: float) -> None:
        self._default = default_seconds

    def wrap(self, method: MethodInfo, handler: Handler) -> Handler:
        # A stream lasts as long as its caller wants (a watch, an agent's session): only a
        # deadline the caller set applies to it.
        default = None if method.grpc_type != "unary" else self._default

        async def handle(request: Message, call: Call) -> Message:
            if call.deadline is None:
                if default is None:
                    return await handler(request, call)
                call.deadline = asyncio.get_running_loop().time() + default
            try:
                async with asyncio.timeout_at(call.deadline):
                    return await handler(request, call)
            except TimeoutError:
                raise DeadlineExceeded("deadline exceeded") from None

        return handle
