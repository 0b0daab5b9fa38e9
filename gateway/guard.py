"""What uvicorn leaves open: request read timeouts and a per-address connection cap.

uvicorn's ``timeout_keep_alive`` only covers the idle time *between* requests, and is reset
by every byte received; ``limit_concurrency`` is one global count checked only once a
request's headers are complete. Neither stops a client that sends its headers or its body
slowly (slowloris), nor one address that opens hundreds of connections. This protocol,
a subclass of uvicorn's httptools one, adds, in the manner of nginx:

- a header timeout: a request's whole head must arrive within ``header_timeout`` of the
  connection opening (first request) or of its first byte (later requests);
- a body timeout: no pause longer than ``body_timeout`` while a body is being sent;
- a cap on the connections one client address holds open at once (``max_per_address``;
  addresses in ``exempt``, such as a load balancer's, are not capped).

A request cut off by a timeout gets ``408`` and the connection closes (a connection that
sent nothing at all is just closed); a connection over the cap gets ``503`` at once and
closes, before any of its bytes are read.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ConnectionGuard:
    """Limits on how a client may hold a connection; ``None``/0 turns one off."""

    header_timeout: float | None = 10.0
    body_timeout: float | None = 30.0
    max_per_address: int = 0
    exempt: tuple[Network, ...] = ()


def _response(status: bytes, message: str, code: int) -> bytes:
    body = b'{"code":%d,"message":"%s","details":[]}' % (code, message.encode())
    head = (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n" % len(body)
    )
    extra = b"retry-after: 1\r\n" if code == 14 else b""
    return head + extra + b"\r\n" + body


TIMEOUT_408 = _response(b"408 Request Timeout", "the request was not sent in time", 4)
REFUSED_503 = _response(b"503 Service Unavailable", "too many connections from this address", 14)


@functools.lru_cache(maxsize=1024)
def _exempt(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with :class:`ConnectionGuard`'s limits.

    Use :func:`guarded` to get a subclass bound to one server's guard and counts.
    """

    guard: ClassVar[ConnectionGuard] = ConnectionGuard()
    per_address: ClassVar[dict[str, int]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._counted = ""
        self._in_request = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        address = self.client[0] if self.client else ""
        if not self._admit(address):
            transport.write(REFUSED_503)
            transport.close()
            return
        self._arm(self.guard.header_timeout, self._headers_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._counted:
            held = self.per_address[self._counted] - 1
            if held:
                self.per_address[self._counted] = held
            else:
                del self.per_address[self._counted]
            self._counted = ""
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_request = True
        if self._timer is None:  # a later request on a kept-alive connection
            self._arm(self.guard.header_timeout, self._headers_late)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()
        self._arm(self.guard.body_timeout, self._body_late)

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._arm(self.guard.body_timeout, self._body_late)

    def on_message_complete(self) -> None:
        self._disarm()
        self._in_request = False
        super().on_message_complete()

    def _admit(self, address: str) -> bool:
        cap = self.guard.max_per_address
        if cap <= 0 or not address or _exempt(address, self.guard.exempt):
            return True
        held = self.per_address.get(address, 0)
        if held >= cap:
            return False
        self.per_address[address] = held + 1
        self._counted = address
        return True

    def _arm(self, seconds: float | None, callback: Callable[[], None]) -> None:
        self._disarm()
        if seconds is not None and not self.transport.is_closing():
            self._timer = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_late(self) -> None:
        self._timer = None
        answer = self._in_request and (self.cycle is None or self.cycle.response_complete)
        self._cut(TIMEOUT_408 if answer else b"")

    def _body_late(self) -> None:
        self._timer = None
        if self.flow.read_paused:  # the server, not the client, holds the body back
            self._arm(self.guard.body_timeout, self._body_late)
            return
        answer = self.cycle is not None and not self.cycle.response_started
        self._cut(TIMEOUT_408 if answer else b"")

    def _cut(self, response: bytes) -> None:
        if self.transport.is_closing():
            return
        if response:
            self.transport.write(response)
        self.transport.close()


def guarded(guard: ConnectionGuard) -> type[GuardedProtocol]:
    """A protocol class for one server: its own guard and its own per-address counts."""
    namespace = {"guard": guard, "per_address": {}}
    return type("BoundGuardedProtocol", (GuardedProtocol,), namespace)
