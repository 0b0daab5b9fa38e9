"""The cookies of a browser session, and reading them from call metadata.

With cookie delivery a sign-in sets two cookies, both ``HttpOnly`` (out of scripts' reach),
``Secure`` and ``SameSite=Strict`` (never sent with another site's requests):

- ``tp_refresh``, the refresh token, sent only to RefreshToken (its ``Path``);
- ``tp_access``, the access token, which authenticates only the methods whose policy sets
  ``cookie_auth`` (read-only streams: a browser's ``EventSource`` cannot send an
  ``Authorization`` header). Its ``Max-Age`` is the token's lifetime.
"""

from __future__ import annotations

from server.pipeline import Call

REFRESH_COOKIE = "tp_refresh"
#: A browser sends a cookie to the paths its Path matches (RFC 6265 5.1.4): ``/v1/auth``
#: would not match ``/v1/auth:refresh``.
REFRESH_PATH = "/v1/auth:refresh"
ACCESS_COOKIE = "tp_access"
ACCESS_PATH = "/v1"
#: Where a cookie arrives: ``cookie`` metadata over gRPC, ``grpcgateway-cookie`` through the
#: gateway (which forwards the HTTP ``Cookie`` header under that name).
_CARRIERS = ("cookie", "grpcgateway-cookie")


def read_cookie(call: Call, name: str) -> str:
    """The value of cookie ``name`` sent with the call ('' if none)."""
    for header in _CARRIERS:
        for part in call.header(header).split(";"):
            key, _, value = part.strip().partition("=")
            if key == name:
                return value.strip().strip('"')
    return ""


def set_cookie(name: str, value: str, path: str, max_age: int) -> str:
    """A ``Set-Cookie`` value for a session cookie (``max_age=0`` clears it)."""
    return (
        f"{name}={value}; Path={path}; Max-Age={max(max_age, 0)}; HttpOnly; Secure; SameSite=Strict"
    )


def refresh_cookie(value: str, max_age: int) -> str:
    """The ``Set-Cookie`` value carrying (or clearing) the refresh token."""
    return set_cookie(REFRESH_COOKIE, value, REFRESH_PATH, max_age)


def access_cookie(value: str, max_age: int) -> str:
    """The ``Set-Cookie`` value carrying (or clearing) the access token."""
    return set_cookie(ACCESS_COOKIE, value, ACCESS_PATH, max_age)
