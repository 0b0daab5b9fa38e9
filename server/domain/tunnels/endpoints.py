"""Tunnel endpoints: URL rules, probe-health transitions and which endpoint gets traffic.

Pure rules, no I/O: the prober (``server/workers/prober.py``) does the probing and a
store applies :func:`apply_probe` to what it saw; :func:`choose_active` then picks the
endpoint traffic goes to. An endpoint's spec and health are part of its tunnel
(:mod:`server.domain.tunnels.model`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from server.domain.common.errors import InvalidArgument, Violations
from server.domain.tunnels.model import EndpointHealth, EndpointSpec

MAX_URL = 2048
MAX_ENDPOINTS = 10
MIN_PRIORITY, MAX_PRIORITY = 0, 100
MIN_WEIGHT, MAX_WEIGHT = 1, 1000
MAX_ERROR = 200
DEFAULT_PORTS = {"http": 80, "https": 443}
SCHEMES = ("http", "https", "tcp")
#: Consecutive-probe counters stop here: far above any threshold, and within a 32-bit column.
MAX_COUNT = 1_000_000
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
_PORT = re.compile(r"^[0-9]{1,5}$")
_USERINFO = re.compile(r"//[^/\s@]*@")
_QUERY = re.compile(r"(://[^\s?#]*)\?[^\s#]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_BAD_HOST = "has an invalid host"


# --- addresses --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EndpointAddress:
    """Where an endpoint is: its scheme, host (lower case, IPv6 without brackets), port,
    and for HTTP the request target (path and query, at least ``/``)."""

    scheme: str
    host: str
    port: int
    path: str

    @property
    def target(self) -> str:
        """``host:port``, with an IPv6 host in brackets."""
        return f"{_bracketed(self.host)}:{self.port}"

    @property
    def authority(self) -> str:
        """The HTTP ``Host`` header: the host, and the port unless it is the default."""
        if DEFAULT_PORTS.get(self.scheme) == self.port:
            return _bracketed(self.host)
        return self.target


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class _UrlError(ValueError):
    """Why a URL is refused; becomes a field violation."""


def parse_endpoint_url(url: str, field: str) -> EndpointAddress:
    """The address an endpoint URL names, or ``InvalidArgument`` naming ``field``.

    Accepts ``http://``, ``https://`` (default ports 80 and 443) and ``tcp://`` (port
    required, no path) URLs of at most 2048 printable ASCII characters, without
    credentials or a fragment. Descriptions never quote the URL, which may hold secrets.
    """
    if not url:
        raise InvalidArgument.single(field, "is required", "REQUIRED")
    try:
        return _parse(url)
    except _UrlError as exc:
        raise InvalidArgument.single(field, str(exc)) from None


def _parse(url: str) -> EndpointAddress:
    if len(url) > MAX_URL:
        raise _UrlError(f"must be at most {MAX_URL} characters")
    if not all(33 <= ord(c) < 127 for c in url):
        raise _UrlError("must be printable ASCII without spaces (percent-encode the rest)")
    if "#" in url:
        raise _UrlError("must not have a fragment (#...)")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise _UrlError("is not a valid URL") from None
    if parts.scheme not in SCHEMES or not url.lower().startswith(f"{parts.scheme}://"):
        raise _UrlError("must be an http://, https:// or tcp:// URL")
    if "@" in parts.netloc:
        raise _UrlError("must not contain credentials (user:password@)")
    host, port = _host_and_port(parts.netloc)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if parts.scheme == "tcp":
        return _tcp(host, port, path)
    return EndpointAddress(parts.scheme, host, port or DEFAULT_PORTS[parts.scheme], path)


def _tcp(host: str, port: int | None, path: str) -> EndpointAddress:
    if port is None:
        raise _UrlError("a tcp:// URL needs a port")
    if path != "/":
        raise _UrlError("a tcp:// URL must not have a path or query")
    return EndpointAddress("tcp", host, port, "")


def _host_and_port(netloc: str) -> tuple[str, int | None]:
    if not netloc:
        raise _UrlError("must name a host")
    if netloc.startswith("["):
        inside, bracket, rest = netloc[1:].partition("]")
        if not bracket:
            raise _UrlError(_BAD_HOST)
        return _ipv6(inside), _port(rest)
    host, colon, port = netloc.partition(":")
    return _hostname(host), _port(colon + port)


def _port(text: str) -> int | None:
    """The port of ``:NNNN`` (``None`` for ''), 1-65535."""
    if not text:
        return None
    digits = text.removeprefix(":")
    if not text.startswith(":") or not _PORT.fullmatch(digits) or not 1 <= int(digits) <= 65535:
        raise _UrlError("must have a port of 1-65535")
    return int(digits)


def _ipv6(text: str) -> str:
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        raise _UrlError(_BAD_HOST) from None
    if address.scope_id:
        raise _UrlError(_BAD_HOST)
    return str(address)


def _hostname(text: str) -> str:
    host = text.lower()
    labels = host.removesuffix(".").split(".")
    if labels[-1].isdigit():  # looks numeric: only a dotted IPv4 address will do
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise _UrlError(_BAD_HOST) from None
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise _UrlError(_BAD_HOST)
    return host


# --- the endpoints of a tunnel ---------------------------------------------------------


def validate_endpoints(
    specs: Sequence[EndpointSpec],
    field: str = "tunnel.endpoints",
    max_endpoints: int = MAX_ENDPOINTS,
) -> list[EndpointSpec]:
    """The endpoints with weight 0 read as 1, or ``InvalidArgument`` naming every bad field
    (``tunnel.endpoints[1].weight``): at most ``max_endpoints``, URLs valid and unique
    (``http://a`` and ``http://a:80/`` are the same), priority 0-100, weight 1-1000."""
    if len(specs) > max_endpoints:
        raise InvalidArgument.single(field, f"must have at most {max_endpoints} endpoints")
    violations = Violations()
    seen: dict[EndpointAddress, int] = {}
    for i, spec in enumerate(specs):
        address = _checked_url(spec.url, f"{field}[{i}].url", violations)
        first = i if address is None else seen.setdefault(address, i)
        if first != i:
            violations.add(f"{field}[{i}].url", f"duplicates {field}[{first}].url")
    cleaned = [_checked_numbers(spec, f"{field}[{i}]", violations) for i, spec in enumerate(specs)]
    violations.raise_if_any()
    return cleaned


def _checked_url(url: str, field: str, violations: Violations) -> EndpointAddress | None:
    try:
        return parse_endpoint_url(url, field)
    except InvalidArgument as exc:
        for v in exc.violations:
            violations.add(v.field, v.description, v.reason)
        return None


def _checked_numbers(spec: EndpointSpec, prefix: str, violations: Violations) -> EndpointSpec:
    if not MIN_PRIORITY <= spec.priority <= MAX_PRIORITY:
        violations.add(f"{prefix}.priority", f"must be {MIN_PRIORITY}-{MAX_PRIORITY}")
    weight = spec.weight or MIN_WEIGHT
    if not MIN_WEIGHT <= weight <= MAX_WEIGHT:
        violations.add(f"{prefix}.weight", f"must be {MIN_WEIGHT}-{MAX_WEIGHT} (0 means 1)")
    return replace(spec, weight=weight)


# --- probe health -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProbeThresholds:
    """How often endpoints are probed and how many probes in a row change their health."""

    unhealthy_after: int = 3
    healthy_after: int = 2
    interval: float = 30.0
    timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.unhealthy_after < 1 or self.healthy_after < 1:
            raise ValueError("probe thresholds must be at least 1")
        if not 0 < self.timeout <= self.interval:
            raise ValueError("the probe timeout must be positive and at most the interval")


@dataclass(frozen=True, slots=True)
class EndpointStatus:
    """An endpoint's probe record: health, the current run of failures or successes, when
    it was last probed (Unix seconds) and what the last failed probe saw."""

    health: EndpointHealth = EndpointHealth.UNKNOWN
    failures: int = 0
    successes: int = 0
    last_probe_at: float | None = None
    last_error: str = ""


def apply_probe(
    status: EndpointStatus, ok: bool, error: str, at: float, thresholds: ProbeThresholds
) -> EndpointStatus:
    """The status after one probe at ``at``.

    ``healthy_after`` good probes in a row make an endpoint healthy and ``unhealthy_after``
    bad ones unhealthy, from any state; anything shorter changes nothing. ``last_error``
    keeps the (shortened, credential-free) error of the last failed probe.
    """
    if ok:
        successes = min(status.successes + 1, MAX_COUNT)
        healthy = successes >= thresholds.healthy_after
        health = EndpointHealth.HEALTHY if healthy else status.health
        return EndpointStatus(health, 0, successes, at, status.last_error)
    failures = min(status.failures + 1, MAX_COUNT)
    unhealthy = failures >= thresholds.unhealthy_after
    health = EndpointHealth.UNHEALTHY if unhealthy else status.health
    return EndpointStatus(health, failures, 0, at, short_error(error) or "probe failed")


def short_error(text: str) -> str:
    """``text`` on one line, at most 200 characters, with URL credentials and queries cut."""
    text = _CONTROL.sub(" ", text).strip()
    text = _QUERY.sub(r"\1?...", _USERINFO.sub("//", text))
    return text if len(text) <= MAX_ERROR else text[: MAX_ERROR - 3] + "..."


# --- choosing the active endpoint -------------------------------------------------------


def choose_active(
    endpoints: Sequence[tuple[EndpointSpec, EndpointHealth]], key: str
) -> EndpointSpec | None:
    """The endpoint traffic of ``key`` (the tunnel id) goes to, or ``None`` if all are down.

    The best (lowest) priority with a healthy endpoint; among its healthy endpoints one
    picked by weighted rendezvous hashing: deterministic for a key, unchanged when an
    endpoint that was not chosen comes or goes, and spread across keys in proportion to
    weight. With no healthy endpoint, the same rule over the ones not yet probed.
    """
    pool = _candidates(endpoints)
    if not pool:
        return None
    return max(pool, key=lambda spec: (_score(key, spec), spec.url))


def next_best(
    endpoints: Sequence[tuple[EndpointSpec, EndpointHealth]], key: str, exclude_url: str
) -> EndpointSpec | None:
    """What :func:`choose_active` picks without the endpoint ``exclude_url`` (a failover)."""
    return choose_active([e for e in endpoints if e[0].url != exclude_url], key)


def _candidates(endpoints: Sequence[tuple[EndpointSpec, EndpointHealth]]) -> list[EndpointSpec]:
    for wanted in (EndpointHealth.HEALTHY, EndpointHealth.UNKNOWN):
        specs = [spec for spec, health in endpoints if health == wanted]
        if specs:
            best = min(spec.priority for spec in specs)
            return [spec for spec in specs if spec.priority == best]
    return []


def _score(key: str, spec: EndpointSpec) -> float:
    """Weighted highest-random-weight score ``-w / ln(u)``, ``u`` uniform in (0, 1) from a
    hash of key and URL: the largest score wins with probability proportional to ``w``."""
    digest = hashlib.blake2b(f"{key}\x00{spec.url}".encode(), digest_size=8).digest()
    unit = ((int.from_bytes(digest, "big") >> 11) + 0.5) / 2**53
    return -max(spec.weight, MIN_WEIGHT) / math.log(unit)
