"""What browsers act on: CORS (preflight, allowed origins, exposed headers) and the
security headers every response carries."""

from __future__ import annotations

from gateway.asgi import Headers, Response
from gateway.errors import GatewayError

SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"x-permitted-cross-domain-policies", b"none"),
    (b"x-dns-prefetch-control", b"off"),
)
HSTS = (b"strict-transport-security", b"max-age=63072000; includeSubDomains")
EXPOSED = (
    b"x-request-id, retry-after, ratelimit, ratelimit-policy, x-ratelimit-limit, "
    b"x-ratelimit-remaining, x-ratelimit-reset, etag, location, deprecation, sunset, link"
)
#: What a preflight allows when the path matches no route.
ANY_METHOD = "GET, POST, PUT, PATCH, DELETE"


def security_headers(*, tls: bool) -> Headers:
    """The headers of every response (HSTS only when served over TLS)."""
    return list(SECURITY_HEADERS) + ([HSTS] if tls else [])


class Cors:
    """Cross-origin access for the configured origins (``*``: any, without credentials)."""

    def __init__(self, origins: frozenset[str]) -> None:
        self._origins = origins

    def allowed(self, origin: str) -> bool:
        """Whether ``origin`` may call."""
        return bool(origin) and ("*" in self._origins or origin in self._origins)

    def preflight(self, origin: str, methods: list[str] | None, requested: str) -> Response:
        """The answer to a preflight from ``origin`` for a path whose routes accept
        ``methods`` (None: no route matched), asking for the ``requested`` headers."""
        if not self.allowed(origin):
            raise GatewayError.simple(7, "origin not allowed", "CORS_ORIGIN_DENIED", 403)
        allow = ", ".join(methods) if methods is not None else ANY_METHOD
        return Response(
            204,
            headers=[
                (b"access-control-allow-methods", allow.encode()),
                (b"access-control-allow-headers", requested.encode("latin-1")),
                (b"access-control-max-age", b"600"),
            ],
            route="preflight",
        )

    def headers(self, origin: str) -> Headers:
        """The response headers for ``origin`` (none unless it is allowed).

        An origin named in the settings is reflected and may send credentials (cookies);
        under ``*`` any origin may read, without them: reflecting every origin with
        credentials would let any page on the same site use the browser's cookies."""
        if not self.allowed(origin):
            return []
        if origin in self._origins:
            return [
                (b"access-control-allow-origin", origin.encode("latin-1")),
                (b"access-control-allow-credentials", b"true"),
                (b"access-control-expose-headers", EXPOSED),
                (b"vary", b"Origin"),
            ]
        return [
            (b"access-control-allow-origin", b"*"),
            (b"access-control-expose-headers", EXPOSED),
        ]
