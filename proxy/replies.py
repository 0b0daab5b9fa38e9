"""The proxy's own answers: JSON bodies that say what went wrong, never a bare reset.

The shape follows the control plane's HTTP errors (``{"error": {"code", "status",
"message", "reason"}}``), with a ``reason`` a client can act on.
"""

from __future__ import annotations

import orjson
from aiohttp import web

_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


class Refusal(Exception):  # noqa: N818 - an answer the proxy gives, not a fault
    """A request the proxy answers itself: HTTP status, reason and message."""

    def __init__(self, status: int, reason: str, message: str, **headers: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.headers = headers


def body(status: int, reason: str, message: str) -> bytes:
    """The JSON error body."""
    error = {"code": status, "status": _STATUS.get(status, "UNKNOWN"), "reason": reason,
             "message": message}  # fmt: skip
    return orjson.dumps({"error": error})


def reply(refusal: Refusal) -> web.Response:
    """The response for ``refusal``."""
    headers = {name.replace("_", "-"): value for name, value in refusal.headers.items()}
    return web.Response(
        status=refusal.status,
        body=body(refusal.status, refusal.reason, str(refusal)),
        content_type="application/json",
        headers=headers,
    )


NOT_ROUTED = Refusal(404, "NO_SUCH_TUNNEL", "no tunnel is served at this address")
