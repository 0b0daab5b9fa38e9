"""Endpoint rules (server/domain/tunnels/endpoints.py): URLs, the endpoint list, probe thresholds,
and which endpoint traffic goes to."""

from __future__ import annotations

from collections import Counter

import pytest

from server.domain.common.errors import FieldViolation, InvalidArgument
from server.domain.tunnels.endpoints import (
    EndpointAddress,
    EndpointStatus,
    ProbeThresholds,
    apply_probe,
    choose_active,
    next_best,
    parse_endpoint_url,
    short_error,
    validate_endpoints,
)
from server.domain.tunnels.model import EndpointHealth, EndpointSpec

HEALTHY, UNHEALTHY, UNKNOWN = (
    EndpointHealth.HEALTHY,
    EndpointHealth.UNHEALTHY,
    EndpointHealth.UNKNOWN,
)
DEFAULTS = ProbeThresholds()

# --- URLs -------------------------------------------------------------------------------

GOOD_URLS = [
    ("http://example.com", EndpointAddress("http", "example.com", 80, "/")),
    ("https://example.com", EndpointAddress("https", "example.com", 443, "/")),
    ("HTTPS://Example.COM:8443/x", EndpointAddress("https", "example.com", 8443, "/x")),
    (
        "http://10.0.0.7:8080/health?full=1",
        EndpointAddress("http", "10.0.0.7", 8080, "/health?full=1"),
    ),
    ("http://[::1]:9000/", EndpointAddress("http", "::1", 9000, "/")),
    ("https://[2001:DB8::1]", EndpointAddress("https", "2001:db8::1", 443, "/")),
    ("http://a?x=1", EndpointAddress("http", "a", 80, "/?x=1")),
    ("http://a/x?", EndpointAddress("http", "a", 80, "/x")),
    ("tcp://db.internal:5432", EndpointAddress("tcp", "db.internal", 5432, "")),
    ("tcp://127.0.0.1:22/", EndpointAddress("tcp", "127.0.0.1", 22, "")),
    ("http://my_service:8080", EndpointAddress("http", "my_service", 8080, "/")),
    ("http://localhost", EndpointAddress("http", "localhost", 80, "/")),
    ("http://a.example.", EndpointAddress("http", "a.example.", 80, "/")),
    ("http://a/" + "p" * 2039, EndpointAddress("http", "a", 80, "/" + "p" * 2039)),
]

BAD_URLS = [
    ("http://a/" + "p" * 2040, "must be at most 2048 characters"),
    ("http://exa mple.com", "printable ASCII"),
    ("http://bücher.example", "printable ASCII"),
    ("http://a/\x00", "printable ASCII"),
    ("http://a/#top", "fragment"),
    ("http://a#", "fragment"),
    ("ftp://example.com", "must be an http://, https:// or tcp:// URL"),
    ("example.com:80", "must be an http://, https:// or tcp:// URL"),
    ("http:example.com", "must be an http://, https:// or tcp:// URL"),
    ("//example.com", "must be an http://, https:// or tcp:// URL"),
    ("http://", "must name a host"),
    ("http:///path", "must name a host"),
    ("http://user:secret@example.com", "credentials"),
    ("http://user@example.com", "credentials"),
    ("http://:80", "invalid host"),
    ("http://-a.example", "invalid host"),
    ("http://a..example", "invalid host"),
    ("http://127.1", "invalid host"),
    ("http://256.1.1.1", "invalid host"),
    ("http://1.2.3.4.5", "invalid host"),
    ("http://::1/", "invalid host"),
    ("http://[::1/", "not a valid URL"),
    ("http://[fe80::1%25eth0]/", "invalid host"),
    ("http://" + "a" * 64 + ".example", "invalid host"),
    ("http://example.com:", "port of 1-65535"),
    ("http://example.com:0", "port of 1-65535"),
    ("http://example.com:65536", "port of 1-65535"),
    ("http://example.com:+80", "port of 1-65535"),
    ("http://example.com:8x", "port of 1-65535"),
    ("tcp://example.com", "needs a port"),
    ("tcp://example.com:22/shell", "must not have a path or query"),
    ("tcp://example.com:22?x=1", "must not have a path or query"),
    ("tcp://example.com:22/?x=1", "must not have a path or query"),
]


@pytest.mark.parametrize(("url", "expected"), GOOD_URLS)
def test_good_urls_parse(url: str, expected: EndpointAddress) -> None:
    assert parse_endpoint_url(url, "f") == expected


@pytest.mark.parametrize(("url", "description"), BAD_URLS)
def test_bad_urls_name_the_field(url: str, description: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_endpoint_url(url, "tunnel.endpoints[0].url")
    [violation] = caught.value.violations
    assert violation.field == "tunnel.endpoints[0].url"
    assert description in violation.description


def test_an_empty_url_is_required() -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_endpoint_url("", "f")
    assert caught.value.violations == [FieldViolation("f", "is required", "REQUIRED")]


def test_a_refused_url_is_never_quoted() -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_endpoint_url("http://admin:hunter2@example.com/", "f")
    assert "hunter2" not in caught.value.message
    assert "hunter2" not in caught.value.violations[0].description


@pytest.mark.parametrize(
    ("url", "target", "authority"),
    [
        ("http://a", "a:80", "a"),
        ("http://a:8080", "a:8080", "a:8080"),
        ("https://a:443", "a:443", "a"),
        ("https://a:80", "a:80", "a:80"),
        ("http://[::1]", "[::1]:80", "[::1]"),
        ("http://[::1]:81", "[::1]:81", "[::1]:81"),
        ("tcp://[::1]:22", "[::1]:22", "[::1]:22"),
    ],
)
def test_target_and_authority(url: str, target: str, authority: str) -> None:
    address = parse_endpoint_url(url, "f")
    assert (address.target, address.authority) == (target, authority)


# --- the endpoint list ------------------------------------------------------------------


def test_valid_endpoints_come_back_with_weight_zero_as_one() -> None:
    specs = [EndpointSpec("http://a", 0, 0), EndpointSpec("tcp://b:1", 100, 1000)]
    assert validate_endpoints(specs) == [
        EndpointSpec("http://a", 0, 1),
        EndpointSpec("tcp://b:1", 100, 1000),
    ]


def test_no_endpoints_is_fine() -> None:
    assert validate_endpoints([]) == []


def violations_of(specs: list[EndpointSpec], **kwargs: int) -> list[tuple[str, str]]:
    with pytest.raises(InvalidArgument) as caught:
        validate_endpoints(specs, **kwargs)  # type: ignore[arg-type]
    return [(v.field, v.description) for v in caught.value.violations]


@pytest.mark.parametrize(
    ("specs", "expected"),
    [
        ([EndpointSpec("http://a", -1)], [("tunnel.endpoints[0].priority", "must be 0-100")]),
        ([EndpointSpec("http://a", 101)], [("tunnel.endpoints[0].priority", "must be 0-100")]),
        (
            [EndpointSpec("http://a"), EndpointSpec("http://b", 0, 1001)],
            [("tunnel.endpoints[1].weight", "must be 1-1000 (0 means 1)")],
        ),
        (
            [EndpointSpec("http://a", 0, -1)],
            [("tunnel.endpoints[0].weight", "must be 1-1000 (0 means 1)")],
        ),
        ([EndpointSpec("")], [("tunnel.endpoints[0].url", "is required")]),
        (
            [EndpointSpec("http://a"), EndpointSpec("http://b"), EndpointSpec("HTTP://A:80/")],
            [("tunnel.endpoints[2].url", "duplicates tunnel.endpoints[0].url")],
        ),
        (
            [EndpointSpec("ftp://a", 200, 5000), EndpointSpec("tcp://b")],
            [
                ("tunnel.endpoints[0].url", "must be an http://, https:// or tcp:// URL"),
                ("tunnel.endpoints[1].url", "a tcp:// URL needs a port"),
                ("tunnel.endpoints[0].priority", "must be 0-100"),
                ("tunnel.endpoints[0].weight", "must be 1-1000 (0 means 1)"),
            ],
        ),
    ],
)
def test_every_bad_field_is_named(
    specs: list[EndpointSpec], expected: list[tuple[str, str]]
) -> None:
    assert violations_of(specs) == expected


def test_different_paths_are_different_endpoints() -> None:
    specs = [EndpointSpec("http://a/x"), EndpointSpec("http://a/y"), EndpointSpec("https://a/x")]
    assert validate_endpoints(specs) == specs


def test_at_most_ten_endpoints_by_default() -> None:
    specs = [EndpointSpec(f"http://e{i}") for i in range(11)]
    assert violations_of(specs) == [("tunnel.endpoints", "must have at most 10 endpoints")]
    assert validate_endpoints(specs[:10]) == specs[:10]


def test_the_limit_and_field_are_parameters() -> None:
    specs = [EndpointSpec("http://a"), EndpointSpec("http://b")]
    with pytest.raises(InvalidArgument) as caught:
        validate_endpoints(specs, "endpoints", max_endpoints=1)
    assert caught.value.violations[0].field == "endpoints"
    assert violations_of([EndpointSpec("http://a", 0, 5000)], max_endpoints=1) == [
        ("tunnel.endpoints[0].weight", "must be 1-1000 (0 means 1)")
    ]


# --- probe thresholds -------------------------------------------------------------------


def run(
    results: str, start: EndpointStatus | None = None, thresholds: ProbeThresholds = DEFAULTS
) -> list[EndpointHealth]:
    """Health after each probe of ``results`` ('+' passed, '-' failed)."""
    status, seen = start or EndpointStatus(), []
    for at, mark in enumerate(results):
        status = apply_probe(status, mark == "+", "refused", float(at), thresholds)
        seen.append(status.health)
    return seen


H, U, K = HEALTHY, UNHEALTHY, UNKNOWN


@pytest.mark.parametrize(
    ("start", "results", "expected"),
    [
        (UNKNOWN, "+", [K]),
        (UNKNOWN, "++", [K, H]),
        (UNKNOWN, "-", [K]),
        (UNKNOWN, "---", [K, K, U]),
        (UNKNOWN, "+-+-+-", [K] * 6),
        (UNKNOWN, "--+--", [K] * 5),
        (UNKNOWN, "-++", [K, K, H]),
        (HEALTHY, "--", [H, H]),
        (HEALTHY, "---", [H, H, U]),
        (HEALTHY, "--+---", [H, H, H, H, H, U]),
        (HEALTHY, "++++", [H] * 4),
        (UNHEALTHY, "+", [U]),
        (UNHEALTHY, "+-+-", [U] * 4),
        (UNHEALTHY, "++", [U, H]),
        (UNHEALTHY, "----", [U] * 4),
    ],
)
def test_health_changes_only_at_the_thresholds(
    start: EndpointHealth, results: str, expected: list[EndpointHealth]
) -> None:
    assert run(results, EndpointStatus(health=start)) == expected


def test_custom_thresholds() -> None:
    thresholds = ProbeThresholds(unhealthy_after=1, healthy_after=4)
    assert run("-+++++", thresholds=thresholds) == [U, U, U, U, H, H]


def test_a_probe_records_its_time_counters_and_error() -> None:
    status = apply_probe(EndpointStatus(), ok=False, error="HTTP 503", at=10.0, thresholds=DEFAULTS)
    assert status == EndpointStatus(UNKNOWN, 1, 0, 10.0, "HTTP 503")
    status = apply_probe(status, ok=True, error="", at=40.0, thresholds=DEFAULTS)
    # last_error keeps what the last failed probe saw (the API field says so).
    assert status == EndpointStatus(UNKNOWN, 0, 1, 40.0, "HTTP 503")


def test_a_failed_probe_always_says_something() -> None:
    status = apply_probe(EndpointStatus(), ok=False, error="  ", at=1.0, thresholds=DEFAULTS)
    assert status.last_error == "probe failed"


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ("connection refused", "connection refused"),
        ("GET http://bob:pw@host/x failed", "GET http://host/x failed"),
        ("see https://h/p?token=s3cret&x=1 now", "see https://h/p?... now"),
        ("line one\r\nline\ttwo\x00", "line one line two"),
        ("x" * 250, "x" * 197 + "..."),
    ],
)
def test_errors_are_short_and_free_of_secrets(error: str, expected: str) -> None:
    assert short_error(error) == expected
    status = apply_probe(EndpointStatus(), ok=False, error=error, at=0.0, thresholds=DEFAULTS)
    assert status.last_error == expected
    assert len(status.last_error) <= 200


@pytest.mark.parametrize(
    "kwargs",
    [{"unhealthy_after": 0}, {"healthy_after": 0}, {"timeout": 0.0}, {"timeout": 31.0}],
)
def test_thresholds_refuse_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="probe"):
        ProbeThresholds(**kwargs)  # type: ignore[arg-type]


# --- choosing the active endpoint -------------------------------------------------------

A0, B0, C0 = (EndpointSpec(f"http://{n}0", 0) for n in "abc")
A1, B1 = (EndpointSpec(f"http://{n}1", 1) for n in "ab")


@pytest.mark.parametrize(
    ("endpoints", "allowed"),
    [
        ([], {None}),
        ([(A0, UNHEALTHY), (A1, UNHEALTHY)], {None}),
        ([(A0, HEALTHY)], {A0}),
        ([(A0, UNHEALTHY), (A1, HEALTHY)], {A1}),
        ([(A0, UNKNOWN), (A1, HEALTHY)], {A1}),  # a healthy endpoint beats an unprobed one
        ([(A0, HEALTHY), (B0, UNHEALTHY), (A1, HEALTHY)], {A0}),
        ([(A0, HEALTHY), (B0, HEALTHY), (A1, HEALTHY)], {A0, B0}),
        ([(A0, UNHEALTHY), (A1, UNKNOWN), (B1, UNKNOWN)], {A1, B1}),  # a new tunnel
        ([(A1, UNKNOWN), (A0, UNKNOWN)], {A0}),
        ([(A0, UNHEALTHY), (A1, UNKNOWN), (B1, UNHEALTHY)], {A1}),
    ],
)
def test_choose_active(
    endpoints: list[tuple[EndpointSpec, EndpointHealth]], allowed: set[EndpointSpec | None]
) -> None:
    for key in ("tun_1", "tun_2", "tun_3", "tun_4"):
        assert choose_active(endpoints, key) in allowed


def test_the_choice_is_deterministic_and_order_free() -> None:
    endpoints = [(A0, HEALTHY), (B0, HEALTHY), (C0, HEALTHY)]
    for i in range(50):
        first = choose_active(endpoints, f"tun_{i}")
        assert choose_active(endpoints[::-1], f"tun_{i}") == first
        assert choose_active(list(endpoints), f"tun_{i}") == first


def test_different_keys_spread_over_the_endpoints() -> None:
    endpoints = [(A0, HEALTHY), (B0, HEALTHY), (C0, HEALTHY)]
    counts = Counter(choose_active(endpoints, f"tun_{i}") for i in range(300))
    assert set(counts) == {A0, B0, C0}
    assert min(counts.values()) > 60


def test_weight_shifts_the_share() -> None:
    heavy = EndpointSpec("http://heavy", 0, 9)
    endpoints = [(heavy, HEALTHY), (A0, HEALTHY)]
    counts = Counter(choose_active(endpoints, f"tun_{i}") for i in range(2000))
    assert 0.86 < counts[heavy] / 2000 < 0.94


def test_next_best_skips_the_excluded_endpoint() -> None:
    endpoints = [(A0, HEALTHY), (B0, HEALTHY), (A1, HEALTHY)]
    for i in range(20):
        key = f"tun_{i}"
        current = choose_active(endpoints, key)
        assert current is not None
        other = next_best(endpoints, key, current.url)
        assert other in {A0, B0} - {current}
    assert next_best([(A0, HEALTHY), (A1, HEALTHY)], "tun_1", A0.url) == A1
    assert next_best([(A0, HEALTHY), (A1, UNHEALTHY)], "tun_1", A0.url) is None
    assert next_best([(A0, HEALTHY)], "tun_1", "http://elsewhere") == A0
