"""Many exchanges over one WebSocket: lanes, each with its own flow control and reset.

An agent dials each proxy it is told of (``wss://{address}/_link``, its agent key as a
bearer credential) and keeps that one connection open; the proxy opens a *lane* on it for
each web request it hands the agent. A lane carries protobuf messages both ways (the proxy
sends ``ExchangeResponse``, the agent ``ExchangeRequest``: proto/tunnelplane/v1/
proxy_link.proto) in binary WebSocket messages, each behind a 5-byte header: the lane's
number (4 bytes, big-endian) and the frame's kind (1 byte).

- ``MESSAGE``: one protobuf message of the lane.
- ``DATA``: a piece of a body, the bytes themselves (what a ``data`` message would hold,
  without wrapping it: a bulk download is mostly these, and each wrap is two more copies).
- ``CREDIT``: the receiver's reader took this many more bytes of the lane's messages (a
  4-byte count), so the sender may send as many more. A sender starts a message only
  while its credit is positive, and each lane starts with ``WINDOW``: a lane whose reader
  stalls (a slow web client, a slow local service) holds at most ``WINDOW`` plus one
  message at the receiving end, and the connection's other lanes flow on.
- ``RESET``: the lane is abandoned (the web client went away, a timeout, a failure); the
  payload is the reason in UTF-8. The other side drops its part at once: the agent
  cancels the local request.

The proxy numbers its lanes upwards from 1 on each connection; the agent takes a
``MESSAGE`` on a number above any it has seen as a new lane and ignores frames of lanes it
has finished. A lane ends cleanly when each side has what it needs (the proxy: the whole
response; the agent: the whole request and its response sent); the end of the connection
ends every lane on it. WebSocket pings (aiohttp's heartbeat) keep idle links alive and
find dead ones.

Why not a gRPC stream per lane, as the link was first: one 1 KiB round trip costs gRPC
about nine times the CPU (``python -m bench.link_protocols``; bench/README.md).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Generic, Protocol, TypeVar

import aiohttp
from google.protobuf.message import DecodeError, Message

log = logging.getLogger("tunnelplane.link")

#: The link's path on the proxy's link port, and the handshake's fields that say for which
#: tunnel and from which agent (the agent key is the ``Authorization`` bearer credential).
PATH = "/_link"
TUNNEL_HEADER = "X-Tunnelplane-Tunnel"
AGENT_HEADER = "X-Tunnelplane-Agent"
HEADER = struct.Struct("!IB")
COUNT = struct.Struct("!I")
MESSAGE, CREDIT, RESET, DATA = 1, 2, 3, 4
#: Bytes of messages a lane may have in flight towards its reader.
WINDOW = 1024 * 1024
#: Credit goes back once the reader has taken this much (fewer, fuller CREDIT frames).
RETURN_AT = WINDOW // 4
#: Largest WebSocket message either side accepts (a WebSocket message carried through is
#: at most 3 MiB; an inline response at most 64 KiB plus its head).
MAX_FRAME = 4 * 1024 * 1024
#: Seconds between pings on a link; a link whose pong is this late is closed.
HEARTBEAT = 20.0

In = TypeVar("In", bound=Message)
Out = TypeVar("Out", bound=Message)


def pieces(chunk: bytes, size: int) -> Iterator[bytes | memoryview]:
    """``chunk`` in pieces of at most ``size`` bytes, without copying it."""
    if len(chunk) <= size:
        yield chunk
        return
    view = memoryview(chunk)
    for offset in range(0, len(chunk), size):
        yield view[offset : offset + size]


class LaneClosedError(ConnectionResetError):
    """The lane is over (reset by the other side, or its link closed)."""


class Socket(Protocol):
    """What a lane needs of a WebSocket: aiohttp's client and server sides both fit."""

    async def send_bytes(self, data: bytes) -> None: ...

    async def close(self, *, code: int = ..., message: bytes = ...) -> bool: ...

    def __aiter__(self) -> AsyncIterator[aiohttp.WSMessage]: ...


class Lane(Generic[In, Out]):
    """One exchange on a link: send ``Out`` messages, receive ``In`` ones."""

    __slots__ = ("_credit", "_credit_waiter", "_inbox", "_link", "_taken", "_waiter",
                 "number", "on_reset", "reason")  # fmt: skip

    def __init__(self, link: Link[In, Out], number: int) -> None:
        self.number = number
        self._link = link
        self._inbox: collections.deque[tuple[In | bytes, int]] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._credit = WINDOW
        self._credit_waiter: asyncio.Future[None] | None = None
        self._taken = 0
        #: Why the lane is over ("" while it is open).
        self.reason = ""
        #: Called once when the other side resets the lane or the link closes.
        self.on_reset: Callable[[str], None] | None = None

    @property
    def over(self) -> bool:
        """Whether the lane ended (either way)."""
        return bool(self.reason)

    async def send(self, message: Out) -> None:
        """Send ``message``, first waiting while the lane's credit is spent."""
        await self._send(MESSAGE, message.SerializeToString())

    async def send_data(self, piece: bytes | memoryview) -> None:
        """Send a piece of a body as it is (the receiver gets ``bytes``)."""
        await self._send(DATA, piece)

    async def _send(self, kind: int, payload: bytes | memoryview) -> None:
        while self._credit <= 0 and not self.reason:
            self._credit_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._credit_waiter
            finally:
                self._credit_waiter = None
        if self.reason:
            raise LaneClosedError(self.reason)
        self._credit -= len(payload)
        await self._link.write(HEADER.pack(self.number, kind) + payload)

    async def receive(self) -> In | bytes | None:
        """The next message (``bytes`` for a piece sent with :meth:`send_data`), or None
        once the lane is over and nothing is left."""
        while not self._inbox:
            if self.reason:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        message, size = self._inbox.popleft()
        self._taken += size
        if self._taken >= RETURN_AT and not self.reason:
            taken, self._taken = self._taken, 0
            with contextlib.suppress(LaneClosedError):
                await self._link.write(HEADER.pack(self.number, CREDIT) + COUNT.pack(taken))
        return message

    def finish(self) -> None:
        """This side is done with the lane and the other side knows it (both ends whole)."""
        self._end("finished")
        self._link.forget(self)

    def reset(self, reason: str) -> None:
        """Abandon the lane: the other side is told at once (``reason`` goes with it)."""
        if not self.reason:
            self._link.write_soon(HEADER.pack(self.number, RESET) + reason.encode()[:200])
        self._end(reason or "reset")
        self._link.forget(self)

    # The link's side.

    def _deliver(self, message: In | bytes, size: int) -> None:
        self._inbox.append((message, size))
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _credited(self, amount: int) -> None:
        self._credit += amount
        if self._credit_waiter is not None and not self._credit_waiter.done():
            self._credit_waiter.set_result(None)

    def _end(self, reason: str) -> bool:
        """Mark the lane over; whether it was open until now."""
        if self.reason:
            return False
        self.reason = reason
        for waiter in (self._waiter, self._credit_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        return True

    def _reset_by_peer(self, reason: str) -> None:
        if self._end(reason) and self.on_reset is not None:
            self.on_reset(reason)


class Link(Generic[In, Out]):
    """One WebSocket carrying lanes. :meth:`run` reads until the connection ends.

    ``incoming`` is the protobuf type of the messages this side receives. With
    ``on_lane`` (the agent's side), a ``MESSAGE`` on a new, higher number opens a lane and
    is handed to it; without (the proxy's side), lanes are opened with :meth:`open`.
    """

    def __init__(
        self,
        socket: Socket,
        incoming: type[In],
        on_lane: Callable[[Lane[In, Out]], None] | None = None,
    ) -> None:
        self._socket = socket
        self._incoming = incoming
        self._on_lane = on_lane
        self._lanes: dict[int, Lane[In, Out]] = {}
        self._next = 1
        self._highest = 0
        self._writes: set[asyncio.Task[None]] = set()
        #: Why the link is over ("" while it is open).
        self.closed = ""

    @property
    def lanes(self) -> int:
        """Lanes open now."""
        return len(self._lanes)

    def open(self) -> Lane[In, Out]:
        """A new lane (the proxy's side)."""
        if self.closed:
            raise LaneClosedError(self.closed)
        lane: Lane[In, Out] = Lane(self, self._next)
        self._lanes[self._next] = lane
        self._next += 1
        return lane

    def forget(self, lane: Lane[In, Out]) -> None:
        """``lane`` is over on this side."""
        if self._lanes.get(lane.number) is lane:
            del self._lanes[lane.number]

    async def write(self, frame: bytes) -> None:
        """Send one frame (waits while the connection's buffer is full)."""
        if self.closed:
            raise LaneClosedError(self.closed)
        try:
            await self._socket.send_bytes(frame)
        except (ConnectionError, RuntimeError) as exc:  # aiohttp: closing or closed
            raise LaneClosedError("the link closed") from exc

    def write_soon(self, frame: bytes) -> None:
        """Send one frame without waiting for it (a reset from synchronous code)."""
        if self.closed:
            return
        task = asyncio.get_running_loop().create_task(self.write(frame))
        self._writes.add(task)
        task.add_done_callback(_written(self._writes))

    async def run(self) -> None:
        """Read frames until the connection ends."""
        reason = "the link closed"
        try:
            async for received in self._socket:
                if received.type != aiohttp.WSMsgType.BINARY:
                    continue  # aiohttp answers pings and ends the loop on a close
                if not self._frame(received.data):
                    reason = "the other side broke the link protocol"
                    await self._socket.close(code=1002, message=b"link protocol error")
                    break
        finally:
            self.close(reason)

    def close(self, reason: str) -> None:
        """The connection is over: so is every lane on it."""
        self.closed = self.closed or reason
        lanes, self._lanes = self._lanes, {}
        for lane in lanes.values():
            lane._reset_by_peer(reason)

    def _frame(self, data: bytes) -> bool:
        """Dispatch one frame; False if it is malformed."""
        if len(data) < HEADER.size:
            return False
        number, kind = HEADER.unpack_from(data)
        payload = data[HEADER.size :]
        if kind == MESSAGE:
            return self._message(number, payload)
        if kind == DATA:
            if (lane := self._lanes.get(number)) is not None:
                lane._deliver(payload, len(payload))
            return True
        if kind == CREDIT and len(payload) == COUNT.size:
            if (lane := self._lanes.get(number)) is not None:
                lane._credited(COUNT.unpack(payload)[0])
            return True
        if kind == RESET:
            if (lane := self._lanes.pop(number, None)) is not None:
                lane._reset_by_peer(payload.decode("utf-8", "replace") or "reset by the other side")
            return True
        return False

    def _message(self, number: int, payload: bytes) -> bool:
        try:
            message = self._incoming.FromString(payload)
        except DecodeError:
            return False
        lane = self._lanes.get(number)
        if lane is None:
            if self._on_lane is None or number <= self._highest:
                return True  # a lane this side has finished: late, harmless
            self._highest = number
            lane = self._lanes[number] = Lane(self, number)
            lane._deliver(message, len(payload))
            self._on_lane(lane)
            return True
        lane._deliver(message, len(payload))
        return True


def _written(tasks: set[asyncio.Task[None]]) -> Callable[[asyncio.Task[None]], None]:
    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("a frame was not sent: the link closed")

    return done
