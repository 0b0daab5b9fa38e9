"""HTTP headers <-> gRPC metadata (grpc-gateway's rules, TRANSCODING.md "Headers").

Request: ``Authorization`` -> ``authorization``; ``Grpc-Metadata-<k>`` -> ``<k>`` (``-Bin``:
base64 value); other permanent HTTP headers -> ``grpcgateway-<name>``; hop-by-hop headers
never; ``X-Forwarded-For`` gets the client address appended and ``X-Forwarded-Host`` is
set; ``X-Request-Id`` is passed through or created; a well-formed W3C ``traceparent`` (and
its ``tracestate``) is passed through as itself. Response: initial metadata ->
``Grpc-Metadata-<k>``, trailers -> ``Grpc-Trailer-<k>`` (only for ``TE: trailers``), and an
allowlist also goes out as plain headers (``Set-Cookie`` only as itself, never mirrored).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gateway.errors import GatewayError

#: IANA permanent message headers that reach the server as ``grpcgateway-<name>``.
PERMANENT = frozenset(
    {
        "accept", "accept-charset", "accept-encoding", "accept-language", "accept-ranges",
        "age", "allow", "alt-svc", "cache-control", "content-disposition", "content-encoding",
        "content-language", "content-length", "content-location", "content-md5",
        "content-range", "content-type", "cookie", "date", "etag", "expect", "expires",
        "from", "host", "if-match", "if-modified-since", "if-none-match", "if-range",
        "if-unmodified-since", "last-event-id", "last-modified", "link", "location",
        "max-forwards", "origin",
        "pragma", "proxy-authenticate", "proxy-authorization", "range", "referer",
        "retry-after", "server", "set-cookie", "strict-transport-security", "user-agent",
        "vary", "via", "warning", "www-authenticate",
    }
)  # fmt: skip
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te",
     "trailer", "http2-settings"}
)  # fmt: skip
#: Metadata keys that are also sent as plain HTTP headers.
PLAIN_RESPONSE_HEADERS = frozenset(
    {
        "ratelimit-policy", "ratelimit", "retry-after", "set-cookie", "location", "etag",
        "deprecation", "sunset", "link", "x-request-id", "cache-control",
    }
)  # fmt: skip
#: Metadata keys only ever sent as their plain header, never mirrored as a readable
#: ``Grpc-Metadata-*``/``Grpc-Trailer-*`` one: a browser hides ``Set-Cookie`` from scripts
#: (an ``HttpOnly`` refresh token stays out of reach of an XSS), a mirror would not.
NEVER_MIRRORED = frozenset({"set-cookie", "set-cookie2"})
_METADATA_PREFIX = "grpc-metadata-"
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
_TIMEOUT = re.compile(r"^([0-9]{1,8})([HMSmun])$")
_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_KEY = re.compile(r"^[0-9a-z_.-]+$")
#: W3C trace context: ``version-traceid-parentid-flags``; a version after 00 may add fields.
_TRACEPARENT = re.compile(
    r"^(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}"
)
_TRACEPARENT_00_LENGTH = 55

Metadata = list[tuple[str, str | bytes]]


@dataclass(slots=True)
class Inbound:
    """What the request headers say, ready for the upstream call."""

    metadata: Metadata
    request_id: str
    timeout: float | None
    trailers_wanted: bool
    content_type: str
    accept: str
    accept_encoding: str
    origin: str
    #: Every ``If-Match`` value, joined as one list (see gateway.preconditions).
    if_match: str = ""
    #: W3C trace context, as sent (repeated headers joined).
    traceparent: str = ""
    tracestate: str = ""


def request_id_from(given: str) -> str:
    """The caller's request id if well-formed, else a new one."""
    return given if _SAFE_REQUEST_ID.match(given) else os.urandom(16).hex()


def parse_timeout(value: str) -> float:
    """``Grpc-Timeout`` (``5S``, ``200m``) in seconds; 400 if malformed."""
    match = _TIMEOUT.match(value.strip())
    if not match:
        raise GatewayError.invalid_argument([("Grpc-Timeout", "use <digits><H|M|S|m|u|n>")])
    return int(match.group(1)) * _UNITS[match.group(2)]


#: Permanent headers the gateway also reads itself, by the Inbound field they fill.
_READ = {"content-type": "content_type", "accept": "accept",
         "accept-encoding": "accept_encoding", "origin": "origin"}  # fmt: skip
_TRACE_CONTEXT = frozenset({"traceparent", "tracestate"})


def inbound(headers: Sequence[tuple[bytes, bytes]], client_host: str) -> Inbound:
    """Map request headers to metadata and pick out what the gateway itself needs."""
    result = Inbound([], "", None, trailers_wanted=False, content_type="", accept="",
                     accept_encoding="", origin="")  # fmt: skip
    forwarded_for = host = ""
    for raw_key, raw_value in headers:
        key = raw_key.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        if key == "x-forwarded-for":
            forwarded_for = value
        elif key == "host":
            host = value
            result.metadata.append(("grpcgateway-host", value))
        else:
            _one(result, key, value)
    chain = f"{forwarded_for}, {client_host}" if forwarded_for else client_host
    result.metadata.append(("x-forwarded-for", chain))
    if host:
        result.metadata.append(("x-forwarded-host", host))
    given = result.request_id
    result.request_id = request_id_from(given)
    result.metadata.append(("x-request-id", result.request_id))
    if result.request_id != given:
        # The upstream may treat a caller's id as an idempotency key; not one made up here.
        result.metadata.append(("x-request-id-generated", "1"))
    if valid_traceparent(result.traceparent):
        result.metadata.append(("traceparent", result.traceparent))
        if result.tracestate:
            result.metadata.append(("tracestate", result.tracestate))
    return result


def valid_traceparent(value: str) -> bool:
    """Whether ``value`` is one well-formed W3C ``traceparent`` (an invalid one, or two,
    restart the trace upstream; its ``tracestate`` then goes nowhere either)."""
    if not _TRACEPARENT.match(value):
        return False
    if value.startswith("00"):
        return len(value) == _TRACEPARENT_00_LENGTH
    return len(value) == _TRACEPARENT_00_LENGTH or value[_TRACEPARENT_00_LENGTH] == "-"


def _one(result: Inbound, key: str, value: str) -> None:
    if key == "authorization":
        result.metadata.append(("authorization", value))
    elif key.startswith(_METADATA_PREFIX):
        result.metadata.append(_grpc_metadata(key[len(_METADATA_PREFIX) :], value))
    elif key == "x-request-id":
        result.request_id = value
    elif key == "grpc-timeout":
        result.timeout = parse_timeout(value)
    elif key == "te":
        result.trailers_wanted = "trailers" in value.lower()
    elif key in _TRACE_CONTEXT:
        given = getattr(result, key)
        setattr(result, key, f"{given}, {value}" if given else value)
    elif key in PERMANENT and key not in HOP_BY_HOP:
        if key in _READ:
            setattr(result, _READ[key], value)
        elif key == "if-match":
            result.if_match = f"{result.if_match}, {value}" if result.if_match else value
        result.metadata.append((f"grpcgateway-{key}", value))


def _grpc_metadata(key: str, value: str) -> tuple[str, str | bytes]:
    if not _KEY.match(key) or key.startswith("grpc-"):
        raise GatewayError.invalid_argument([(f"Grpc-Metadata-{key}", "is not a valid key")])
    if key.endswith("-bin"):
        try:
            return key, base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
        except binascii.Error:
            raise GatewayError.invalid_argument(
                [(f"Grpc-Metadata-{key}", "-Bin values must be base64")]
            ) from None
    return key, value


def outbound(
    initial: Iterable[tuple[str, str | bytes]],
    trailing: Iterable[tuple[str, str | bytes]],
    *,
    trailers_wanted: bool,
) -> list[tuple[bytes, bytes]]:
    """Response headers from the upstream's metadata."""
    headers: list[tuple[bytes, bytes]] = []
    plain: set[str] = set()
    for key, value in initial:
        _out(headers, plain, "Grpc-Metadata-", key, value, forward=True)
    for key, value in trailing:
        # An error is often trailers-only: its allowlisted metadata still becomes headers.
        if key != "grpc-status-details-bin":
            _out(headers, plain, "Grpc-Trailer-", key, value, forward=trailers_wanted)
    return headers


def _out(
    headers: list[tuple[bytes, bytes]],
    plain: set[str],
    prefix: str,
    key: str,
    value: str | bytes,
    *,
    forward: bool,
) -> None:
    text = base64.b64encode(value).decode() if isinstance(value, bytes) else value
    if "\r" in text or "\n" in text:
        return
    encoded = text.encode("latin-1", errors="replace")
    if forward and key not in NEVER_MIRRORED:
        headers.append(((prefix + key).encode(), encoded))
    if key in PLAIN_RESPONSE_HEADERS and (key == "set-cookie" or key not in plain):
        plain.add(key)
        headers.append((key.encode(), encoded))
        if key in _LEGACY_RATE_FIELDS:
            _legacy_rate_headers(headers, plain, key, text)


#: The IETF rate-limit fields and the ``X-RateLimit-*`` headers each one's parameters give.
_LEGACY_RATE_FIELDS = {
    "ratelimit-policy": (("q", "x-ratelimit-limit"),),
    "ratelimit": (("r", "x-ratelimit-remaining"), ("t", "x-ratelimit-reset")),
}
_RATE_PARAMETER = re.compile(r";\s*([a-z]+)=([0-9]{1,15})(?=;|$)")


def _legacy_rate_headers(
    headers: list[tuple[bytes, bytes]], plain: set[str], key: str, value: str
) -> None:
    """HTTP clients also get the de-facto ``X-RateLimit-Limit``/``-Remaining``/``-Reset``.
    The server sends only the IETF pair over gRPC (each metadata entry costs every call);
    the trio is the same numbers: ``q`` of the policy, ``r`` and ``t`` of the current
    window."""
    parameters = dict(_RATE_PARAMETER.findall(value))
    for name, header in _LEGACY_RATE_FIELDS[key]:
        if name in parameters and header not in plain:
            plain.add(header)
            headers.append((header.encode(), parameters[name].encode()))
