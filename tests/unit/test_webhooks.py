"""Webhook rules (server/domain/webhooks/rules.py): secrets, signatures checked by the independent
``standardwebhooks`` library, payloads, filters, transformations, retries, outcomes, URLs."""

from __future__ import annotations

import base64
import json
import random
import time
from datetime import UTC, datetime, timedelta, timezone

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from server.domain.common.addresses import address_allowed
from server.domain.common.errors import Code, FailedPrecondition, InvalidArgument, Unauthenticated
from server.domain.webhooks import rules as wh

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
KNOWN = frozenset({"tunnel.created", "tunnel.deleted", "endpoint.disabled", "user.key.rotated"})
BODY = b'{"type":"tunnel.created","timestamp":"2026-03-10T12:00:00Z","data":{"id":"t1"}}'


def rng(seed: int) -> random.Random:
    return random.Random(seed)  # noqa: S311 - jitter, not a secret


def fields(exc: pytest.ExceptionInfo[InvalidArgument]) -> list[str]:
    return [v.field for v in exc.value.violations]


# --- secrets ------------------------------------------------------------------------------


def test_new_secret_is_prefixed_base64_of_32_random_bytes() -> None:
    first, second = wh.new_secret(), wh.new_secret()
    assert first.startswith("whsec_")
    assert first != second
    assert len(base64.b64decode(first.removeprefix("whsec_"), validate=True)) == 32
    assert wh.parse_secret(first) == base64.b64decode(first[6:])


@pytest.mark.parametrize(
    "secret",
    [
        "",
        "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",  # no prefix
        "whsec_",
        "whsec_not*base64!",
        "whsec_" + base64.b64encode(b"x" * 23).decode(),  # too short
        "whsec_" + base64.b64encode(b"x" * 65).decode(),  # too long
    ],
)
def test_parse_secret_refuses_malformed(secret: str) -> None:
    with pytest.raises(ValueError, match="webhook secret"):
        wh.parse_secret(secret)


def test_parse_secret_accepts_unpadded_base64() -> None:
    key = bytes(range(25))
    unpadded = "whsec_" + base64.b64encode(key).decode().rstrip("=")
    assert wh.parse_secret(unpadded) == key


# --- signatures, checked by the standardwebhooks package ----------------------------------


def test_signature_matches_the_standard_webhooks_reference_vector() -> None:
    # The example of the Standard Webhooks spec and its reference libraries.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    assert wh.sign([secret], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == (
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


def test_independent_library_verifies_our_headers() -> None:
    secret, stamp = wh.new_secret(), int(time.time())
    sent = wh.headers([secret], "msg_1", stamp, BODY)
    assert set(sent) == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    assert sent["webhook-timestamp"] == str(stamp)
    assert Webhook(secret).verify(BODY, sent) == json.loads(BODY)


def test_during_rotation_both_secrets_sign_and_each_alone_verifies() -> None:
    old, new, stamp = wh.new_secret(), wh.new_secret(), int(time.time())
    sent = wh.headers([new, old], "msg_rot", stamp, BODY)
    assert len(sent["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        Webhook(secret).verify(BODY, sent)
        wh.verify(secret, sent, BODY, datetime.fromtimestamp(stamp, UTC))
    with pytest.raises(WebhookVerificationError):
        Webhook(wh.new_secret()).verify(BODY, sent)


@pytest.mark.parametrize(
    ("body", "shift"),
    [
        (BODY.replace(b"t1", b"t2"), 0),  # tampered body
        (BODY, -301),  # older than five minutes
        (BODY, 301),  # too far in the future
    ],
)
def test_independent_library_refuses_tampering_and_stale_timestamps(
    body: bytes, shift: int
) -> None:
    secret, now = wh.new_secret(), int(time.time())
    sent = wh.headers([secret], "msg_2", now + shift, BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, sent)
    with pytest.raises(wh.SignatureInvalid):
        wh.verify(secret, sent, body, datetime.fromtimestamp(now, UTC))


def test_independent_library_refuses_a_changed_id() -> None:
    secret, stamp = wh.new_secret(), int(time.time())
    sent = wh.headers([secret], "msg_3", stamp, BODY) | {"webhook-id": "msg_4"}
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY, sent)


def test_sign_needs_a_secret() -> None:
    with pytest.raises(ValueError, match="at least one secret"):
        wh.sign([], "msg", 1, BODY)


def test_verify_accepts_within_tolerance_and_any_header_case() -> None:
    secret, stamp = wh.new_secret(), 1_700_000_000
    sent = {k.upper(): v for k, v in wh.headers([secret], "m", stamp, BODY).items()}
    at = datetime.fromtimestamp(stamp + 300, UTC)
    wh.verify(secret, sent, BODY, at)
    wh.verify(secret, sent, BODY, datetime.fromtimestamp(stamp - 60, UTC), tolerance=60)


@pytest.mark.parametrize(
    "change",
    [
        {"webhook-id": ""},
        {"webhook-timestamp": "-5"},
        {"webhook-timestamp": "1.7e9"},
        {"webhook-timestamp": "\u0661\u0667" + "\u0660" * 8},  # non-ASCII digits
        {"webhook-signature": ""},
        {"webhook-signature": "v2,AAAA"},
        {"webhook-signature": "v1,not base64!"},
        {"webhook-signature": "v1"},
    ],
)
def test_verify_refuses_malformed_headers(change: dict[str, str]) -> None:
    secret, stamp = wh.new_secret(), 1_700_000_000
    sent = wh.headers([secret], "m", stamp, BODY) | change
    with pytest.raises(wh.SignatureInvalid) as exc:
        wh.verify(secret, sent, BODY, datetime.fromtimestamp(stamp, UTC))
    assert isinstance(exc.value, Unauthenticated)
    assert exc.value.reason == "WEBHOOK_SIGNATURE_INVALID"


def test_verify_skips_unknown_versions_beside_a_good_signature() -> None:
    secret, stamp = wh.new_secret(), 1_700_000_000
    sent = wh.headers([secret], "m", stamp, BODY)
    sent["webhook-signature"] = "v2,AAAA junk " + sent["webhook-signature"]
    wh.verify(secret, sent, BODY, datetime.fromtimestamp(stamp, UTC))


# --- payloads -----------------------------------------------------------------------------


def test_payload_is_compact_json_with_utc_z_timestamp() -> None:
    moment = datetime(2026, 3, 10, 13, 0, 0, 250000, tzinfo=timezone(timedelta(hours=1)))
    body = wh.payload("tunnel.created", moment, {"id": "t1", "name": "é"})
    assert (
        body
        == (
            '{"type":"tunnel.created","timestamp":"2026-03-10T12:00:00.250000Z",'
            '"data":{"id":"t1","name":"é"}}'
        ).encode()
    )
    assert wh.rfc3339(NOW) == "2026-03-10T12:00:00Z"


def test_payload_at_the_limit_passes_and_over_it_is_refused() -> None:
    overhead = len(wh.payload("t.x", NOW, {"p": ""}))
    assert len(wh.payload("t.x", NOW, {"p": "a" * (wh.MAX_PAYLOAD - overhead)})) == 20 * 1024
    with pytest.raises(wh.PayloadTooLarge) as exc:
        wh.payload("t.x", NOW, {"p": "a" * (wh.MAX_PAYLOAD - overhead + 1)})
    assert isinstance(exc.value, FailedPrecondition)
    assert exc.value.code is Code.FAILED_PRECONDITION
    assert exc.value.size == wh.MAX_PAYLOAD + 1


@pytest.mark.parametrize(
    ("moment", "data", "error"),
    [
        (datetime(2026, 1, 1), {}, ValueError),  # noqa: DTZ001 - naive on purpose
        (NOW, {"x": float("nan")}, ValueError),
        (NOW, {"x": object()}, TypeError),
    ],
)
def test_payload_refuses_programming_errors(
    moment: datetime, data: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        wh.payload("t.x", moment, data)


# --- filters ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ([], ()),
        (["tunnel.created"], ("tunnel.created",)),
        (["tunnel.*", "*", "user.key.*", "user.*"], ("tunnel.*", "*", "user.key.*", "user.*")),
        (["tunnel.created", "tunnel.*", "tunnel.created"], ("tunnel.created", "tunnel.*")),
    ],
)
def test_validate_filters_accepts(filters: list[str], expected: tuple[str, ...]) -> None:
    assert wh.validate_filters(filters, KNOWN) == expected


@pytest.mark.parametrize(
    ("filters", "bad"),
    [
        (["tunnel.updated"], [0]),
        (["tunnel.created", "Tunnel.Created", ""], [1, 2]),
        (["tunnel*", "*.created", "tunnel.*.x", "**", "tunnel..created"], [0, 1, 2, 3, 4]),
        (["billing.*", "tunnel.created.*", "user.ke.*"], [0, 1, 2]),
        ([" tunnel.created"], [0]),
    ],
)
def test_validate_filters_names_each_bad_entry(filters: list[str], bad: list[int]) -> None:
    with pytest.raises(InvalidArgument) as exc:
        wh.validate_filters(filters, KNOWN)
    assert fields(exc) == [f"webhook.event_types[{i}]" for i in bad]


def test_validate_filters_limits_the_count_and_uses_the_given_field() -> None:
    assert len(wh.validate_filters(["tunnel.created"] * 50, KNOWN)) == 1
    with pytest.raises(InvalidArgument) as exc:
        wh.validate_filters(["tunnel.created"] * 51, KNOWN, field="endpoint.filter")
    assert fields(exc) == ["endpoint.filter"]


@pytest.mark.parametrize(
    ("filters", "event_type", "expected"),
    [
        ((), "tunnel.created", True),
        (("*",), "anything.at.all", True),
        (("tunnel.created",), "tunnel.created", True),
        (("tunnel.created",), "tunnel.deleted", False),
        (("tunnel.*",), "tunnel.deleted", True),
        (("tunnel.*",), "tunnel", False),
        (("tunnel.*",), "tunnels.created", False),
        (("user.*",), "user.key.rotated", True),
        (("user.key.*",), "user.created", False),
        (("endpoint.disabled", "tunnel.*"), "tunnel.created", True),
    ],
)
def test_matches(filters: tuple[str, ...], event_type: str, expected: bool) -> None:
    assert wh.matches(filters, event_type) is expected


# --- transformations ----------------------------------------------------------------------

EVENT = {
    "type": "tunnel.created",
    "timestamp": "2026-03-10T12:00:00Z",
    "data": {"id": "t1", "tags": ["a", "b"]},
}


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("data", {"id": "t1", "tags": ["a", "b"]}),
        (
            "{k: type, id: data.id, n: length(data.tags)}",
            {"k": "tunnel.created", "id": "t1", "n": 2},
        ),
        ("data.id", {"value": "t1"}),
        ("data.tags[0]", {"value": "a"}),
        ("data.tags", {"value": ["a", "b"]}),
        ("data.missing", {"value": None}),
        ('not_null(data.missing, data.id, `"x"`)', {"value": "t1"}),
    ],
)
def test_apply_transform(expression: str, expected: dict[str, object]) -> None:
    compiled = wh.compile_transform(expression)
    assert compiled.expression == expression
    assert wh.apply_transform(compiled, EVENT) == expected


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("", "required"),
        ("   ", "required"),
        ("data.[", "incomplete"),
        ("data id", "position 5: Unexpected token: id"),
        ("`{bad", "position 0: Unclosed ` delimiter"),
        ("[?a == ]", "position 7"),
        ("nope(@)", "unknown JMESPath function nope()"),
        ("length(@, @)", "length() takes 1 argument(s), not 2"),
        ("not_null()", "not_null() takes at least 1 argument(s), not 0"),
        ("x" * 2001, "at most 2000 characters"),
        ("(" * 1999 + "a", "nested too deeply"),
    ],
)
def test_compile_transform_refuses(expression: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        wh.compile_transform(expression, field="endpoint.transform")
    assert fields(exc) == ["endpoint.transform"]
    assert message in exc.value.violations[0].description


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("length(data.missing)", "invalid type"),
        ("sum(data.tags)", "invalid type"),
        # Each stage doubles the result: 2**150 elements unless the budget stops it.
        ("[@,@][]|" * 150 + "length(@)", "too large"),
        ("{a:@,b:@}|" * 150 + "to_string(@)", "too large"),
    ],
)
def test_apply_transform_failures_are_domain_errors(expression: str, message: str) -> None:
    compiled = wh.compile_transform(expression)
    with pytest.raises(wh.TransformFailed, match=message) as exc:
        wh.apply_transform(compiled, EVENT)
    assert exc.value.reason == "WEBHOOK_TRANSFORM_FAILED"


# --- retries and outcomes -----------------------------------------------------------------


def test_retry_schedule_is_the_documented_one() -> None:
    hours = [d.total_seconds() / 3600 for d in wh.RETRY_SCHEDULE]
    assert hours == [5 / 3600, 5 / 60, 0.5, 2, 5, 10, 10]


@pytest.mark.parametrize("attempt", range(1, 8))
def test_next_attempt_jitters_within_20_percent(attempt: int) -> None:
    base = wh.RETRY_SCHEDULE[attempt - 1]
    for seed in range(20):
        due = wh.next_attempt(attempt, NOW, rng=rng(seed))
        assert due is not None
        assert base * 0.8 <= due - NOW <= base * 1.2


@pytest.mark.parametrize(
    ("attempt", "retry_after", "at_least", "at_most"),
    [
        (1, 60.0, timedelta(seconds=60), timedelta(seconds=60)),
        (1, 1.0, timedelta(seconds=4), timedelta(seconds=6)),  # the schedule is longer
        (1, -5.0, timedelta(seconds=4), timedelta(seconds=6)),
        (2, 10 * 86400.0, timedelta(hours=24), timedelta(hours=24)),  # capped
    ],
)
def test_next_attempt_honours_retry_after(
    attempt: int, retry_after: float, at_least: timedelta, at_most: timedelta
) -> None:
    due = wh.next_attempt(attempt, NOW, rng=rng(1), retry_after=retry_after)
    assert due is not None
    assert at_least <= due - NOW <= at_most


def test_next_attempt_ends_with_the_schedule() -> None:
    assert wh.next_attempt(8, NOW, rng=rng(0)) is None
    assert wh.next_attempt(1, NOW, rng=rng(0), schedule=()) is None
    one_day = [timedelta(days=1)]
    assert wh.next_attempt(2, NOW, rng=rng(0), retry_after=30.0, schedule=one_day) is None
    with pytest.raises(ValueError, match="numbered from 1"):
        wh.next_attempt(0, NOW, rng=rng(0))


@pytest.mark.parametrize(
    ("failing_for", "expected"),
    [
        (timedelta(0), False),
        (timedelta(days=5) - timedelta(seconds=1), False),
        (timedelta(days=5), True),
        (timedelta(days=9), True),
    ],
)
def test_should_disable(failing_for: timedelta, expected: bool) -> None:
    assert wh.should_disable(NOW - failing_for, NOW) is expected


@pytest.mark.parametrize(
    ("status", "error", "expected"),
    [
        (200, None, wh.Outcome.SUCCESS),
        (204, None, wh.Outcome.SUCCESS),
        (299, None, wh.Outcome.SUCCESS),
        (410, None, wh.Outcome.GONE),
        (301, None, wh.Outcome.RETRY),
        (304, None, wh.Outcome.RETRY),
        (400, None, wh.Outcome.RETRY),
        (404, None, wh.Outcome.RETRY),
        (429, None, wh.Outcome.RETRY),
        (500, None, wh.Outcome.RETRY),
        (503, None, wh.Outcome.RETRY),
        (199, None, wh.Outcome.RETRY),
        (None, "timeout after 15 s", wh.Outcome.RETRY),
        (None, None, wh.Outcome.RETRY),
        (200, "body read timed out", wh.Outcome.RETRY),
    ],
)
def test_classify(status: int | None, error: str | None, expected: wh.Outcome) -> None:
    assert wh.classify(status, error) is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("120", 120.0),
        (" 0 ", 0.0),
        ("-5", None),
        ("1.5", None),
        ("soon", None),
        ("Tue, 10 Mar 2026 12:01:30 GMT", 90.0),
        ("Tuesday, 10-Mar-26 12:00:10 GMT", 10.0),  # RFC 850, obsolete but allowed
        ("Tue Mar 10 12:00:05 2026", 5.0),  # asctime
        ("Tue, 10 Mar 2026 11:00:00 GMT", 0.0),  # in the past
    ],
)
def test_retry_after_seconds(value: str | None, expected: float | None) -> None:
    assert wh.retry_after_seconds(value, NOW) == expected


# --- URL policy ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "require_https"),
    [
        ("https://hooks.example.com/in", True),
        ("https://hooks.example.com:8443/in?x=1", True),
        ("http://localhost:8080/hook", False),
        ("HTTPS://[2001:db8::1]/x", True),
    ],
)
def test_check_url_accepts(url: str, require_https: bool) -> None:
    assert wh.check_url(url, require_https=require_https) == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://hooks.example.com/in", "must use https"),
        ("ftp://hooks.example.com/in", "an http or https URL"),
        ("hooks.example.com/in", "an http or https URL"),
        ("https:///path", "a host is required"),
        ("https://user:pw@hooks.example.com/", "no credentials"),
        ("https://user@hooks.example.com/", "no credentials"),
        ("https://hooks.example.com/#frag", "no fragment"),
        ("https://hooks.example.com/#", "no fragment"),
        ("https://hooks.example.com:99999/", "not a valid URL"),
        ("https://[::1/", "not a valid URL"),
        ("https://hooks.example.com/a b", "no spaces"),
        ("https://hooks.example.com/\n", "no spaces"),
        ("https://example.com/" + "a" * 2029, "at most 2048 characters"),
    ],
)
def test_check_url_refuses(url: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        wh.check_url(url, require_https=True, field="endpoint.uri")
    assert fields(exc) == ["endpoint.uri"]
    assert message in exc.value.violations[0].description


PUBLIC = ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "::ffff:8.8.8.8", "2002:808:808::"]
PRIVATE = [
    "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1", "169.254.169.254",
    "240.0.0.1", "192.0.2.1", "::1", "fe80::1", "fe80::1%eth0", "fd00::1", "fec0::1",
    "2001:db8::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "64:ff9b::a00:1",
    "2002:7f00:1::", "2001:0:4136:e378:8000:63bf:80ff:fffe",
]  # fmt: skip
NEVER = [
    "0.0.0.0",  # noqa: S104 - an address to refuse, not a bind
    "::",
    "224.0.0.1",
    "ff02::1",
    "::ffff:224.0.0.1",
    "not an ip",
    "",
]


@pytest.mark.parametrize("ip", PUBLIC)
def test_public_addresses_are_allowed(ip: str) -> None:
    assert address_allowed(ip, allow_private=False)


@pytest.mark.parametrize("ip", PRIVATE)
def test_private_addresses_need_allow_private(ip: str) -> None:
    assert not address_allowed(ip, allow_private=False)
    assert address_allowed(ip, allow_private=True)


@pytest.mark.parametrize("ip", NEVER)
def test_unusable_addresses_are_never_allowed(ip: str) -> None:
    assert not address_allowed(ip, allow_private=True)


# --- the JSON API's names in payloads -----------------------------------------------------


def test_json_name_is_the_api_s_name_for_every_field() -> None:
    """Every field of every API message: the payload name is the name the JSON API uses."""
    from google.protobuf.descriptor import Descriptor
    from tunnelplane.v1 import (
        admin_pb2,
        auth_pb2,
        events_pb2,
        operations_pb2,
        tunnels_pb2,
        users_pb2,
        webhooks_pb2,
    )

    def fields(message: Descriptor) -> list[tuple[str, str]]:
        found = [(f.name, f.json_name) for f in message.fields]
        for nested in message.nested_types:
            found += fields(nested)
        return found

    modules = (admin_pb2, auth_pb2, events_pb2, operations_pb2, tunnels_pb2, users_pb2)
    pairs = [
        pair
        for module in (*modules, webhooks_pb2)
        for message in module.DESCRIPTOR.message_types_by_name.values()
        for pair in fields(message)
    ]
    assert pairs
    assert [(name, wh.json_name(name)) for name, _ in pairs] == pairs


def test_json_names_renames_keys_at_every_depth_and_keeps_values() -> None:
    snapshot = {
        "display_name": "a_b",
        "active_endpoint": "",
        "endpoints": [{"url": "http://x/", "last_probe_time": "t"}],
        "from": "created",
    }
    assert wh.json_names(snapshot) == {
        "displayName": "a_b",
        "activeEndpoint": "",
        "endpoints": [{"url": "http://x/", "lastProbeTime": "t"}],
        "from": "created",
    }
