"""The call pipeline, independent of any transport.

A call is a request message plus a small :class:`Call` context. Stages wrap a handler in
a fixed order; the chain is compiled once per method at start-up (so per-method choices,
bound metric children and the policy are looked up once, not per call). The grpc.aio
adapter and the in-process HTTP dispatch both run exactly these chains, so both
transports behave the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message

from server.domain.audit.model import AuditTrail
from server.domain.common.errors import Cancelled, Code, Unauthenticated, code_of
from server.domain.identity.model import ClientInfo, Principal
from server.policy import MethodPolicy


@dataclass(frozen=True, slots=True)
class MethodInfo:
    """One RPC: its names, message types and policy."""

    full_name: str
    service: str
    name: str
    grpc_type: str
    request_type: type[Message]
    response_type: type[Message]
    policy: MethodPolicy
    descriptor: MethodDescriptor


class Call:
    """What a stage or servicer knows about the call being served."""

    __slots__ = (
        "audit",
        "auth_error",
        "client_ip",
        "deadline",
        "metadata",
        "method",
        "peer",
        "principal",
        "request_id",
        "request_id_given",
        "response_headers",
        "secure",
        "stream",
        "trailers",
        "transport",
    )

    def __init__(
        self,
        method: MethodInfo,
        metadata: Mapping[str, str],
        *,
        peer: str,
        transport: str,
        deadline: float | None = None,
    ) -> None:
        self.method = method
        self.metadata = metadata
        self.peer = peer
        self.transport = transport
        #: Absolute deadline on the event loop's clock, if any.
        self.deadline = deadline
        self.request_id = ""
        #: Whether the caller chose the request id (a retry may send it again), rather
        #: than the server or the HTTP gateway making one up.
        self.request_id_given = False
        #: Whether the call arrived over TLS (or through a trusted TLS-terminating proxy).
        self.secure = False
        self.principal: Principal | None = None
        #: A credential that failed verification, raised by the authorize stage.
        self.auth_error: Unauthenticated | None = None
        #: The caller's address (the peer, or what a trusted proxy forwarded).
        self.client_ip = peer
        #: Initial metadata to send (HTTP response headers through the gateway).
        self.response_headers: list[tuple[str, str]] = []
        self.trailers: list[tuple[str, str]] = []
        #: The message channel of a streaming call (None for a unary one).
        self.stream: CallStream | None = None
        #: The audit trail of a call of an audited method, opened by the audit stage; the
        #: servicer hands it to the use case (None when the method is not audited).
        self.audit: AuditTrail | None = None

    def header(self, name: str) -> str:
        """A request metadata value ('' if absent). Names are lower case."""
        return self.metadata.get(name, "")

    def set_header(self, name: str, value: str) -> None:
        """Add response metadata, sent before the response."""
        self.response_headers.append((name, value))

    async def send(self, message: Message) -> None:
        """Send one message of a server stream (response headers go first)."""
        if self.stream is None:
            raise RuntimeError(f"{self.method.full_name} does not stream responses")
        await self.stream.send(message)

    async def receive(self) -> Message | None:
        """The next message of a client stream; ``None`` once the client is done."""
        if self.stream is None:
            raise RuntimeError(f"{self.method.full_name} does not stream requests")
        return await self.stream.receive()

    @property
    def client(self) -> ClientInfo:
        """The caller's address and user agent."""
        agent = self.metadata.get("grpcgateway-user-agent") or self.metadata.get("user-agent", "")
        return ClientInfo(self.client_ip, agent)

    @property
    def time_remaining(self) -> float | None:
        """Seconds until the deadline, if there is one."""
        if self.deadline is None:
            return None
        return self.deadline - asyncio.get_running_loop().time()


class CallStream(Protocol):
    """How a streaming call's endpoint talks to its transport.

    A streaming method runs through the same chain as a unary one: its endpoint sends
    messages through the call (:meth:`Call.send`), reads the client's (:meth:`Call.receive`)
    and returns an empty response when the stream is done, so every stage sees the whole
    stream as one call with one outcome.
    """

    async def send(self, message: Message) -> None:
        """Send one response message."""
        ...

    async def receive(self) -> Message | None:
        """The next request message, or ``None`` at the end of the client's stream."""
        ...


Handler = Callable[[Message, Call], Awaitable[Message]]


class Stage(Protocol):
    """One concern of the pipeline (logging, auth, ...)."""

    def wrap(self, method: MethodInfo, handler: Handler) -> Handler:
        """``handler`` with this stage around it, specialised for ``method``."""
        ...


class Pipeline:
    """An ordered list of stages, outermost first."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        self._stages = list(stages)

    def build(self, method: MethodInfo, endpoint: Handler) -> Handler:
        """The compiled chain for ``method`` ending in ``endpoint``."""
        handler = endpoint
        for stage in reversed(self._stages):
            handler = stage.wrap(method, handler)
        return handler


def outcome_of(exc: BaseException) -> Code:
    """The status a failed call ends with (a cancelled task is CANCELLED)."""
    if isinstance(exc, asyncio.CancelledError):
        return Cancelled.code
    return code_of(exc)
