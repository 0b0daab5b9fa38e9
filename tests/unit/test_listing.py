"""AIP-160 filters, AIP-132 order_by, page sizes and page tokens
(server/domain/common/listing.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from server.domain.common.errors import InvalidArgument
from server.domain.common.listing import (
    MAX_FILTER_DEPTH,
    MAX_FILTER_LENGTH,
    MAX_FILTER_TERMS,
    And,
    Compare,
    Expr,
    FilterField,
    Lister,
    ListSpec,
    Not,
    Or,
    OrderKey,
    PageTokenCodec,
    parse_filter,
    parse_order_by,
)

FIELDS = {
    "name": FilterField("string"),
    "tier": FilterField("enum", frozenset({"free", "premium", "enterprise"})),
    "owner.tier": FilterField("enum", frozenset({"free", "premium"})),
    "create_time": FilterField("timestamp"),
    "active": FilterField("bool"),
    "count": FilterField("int"),
}
SPEC = ListSpec(
    filter_fields=FIELDS,
    order_fields=frozenset({"name", "create_time", "count"}),
    default_order=(OrderKey("create_time", descending=True),),
)
JAN_1 = datetime(2024, 1, 1, tzinfo=UTC)


def violation_field(exc: InvalidArgument) -> str:
    """The one field an InvalidArgument names."""
    assert len(exc.violations) == 1, exc.violations
    return exc.violations[0].field


def lister(default: int = 50, maximum: int = 1000, secret: bytes = b"s" * 32) -> Lister:
    return Lister(PageTokenCodec(secret), default_page_size=default, max_page_size=maximum)


# --- parse_filter: valid ------------------------------------------------------------

VALID_FILTERS: list[tuple[str, Expr | None]] = [
    ("", None),
    ("   \t\n", None),
    ('name = "Ann"', Compare("name", "=", "Ann")),
    ("name = 'Ann'", Compare("name", "=", "Ann")),
    ('name != "a b"', Compare("name", "!=", "a b")),
    ('name : "ann"', Compare("name", ":", "ann")),
    ("name = Ann", Compare("name", "=", "Ann")),
    ("name = 42", Compare("name", "=", "42")),
    ('name = "say \\"hi\\""', Compare("name", "=", 'say "hi"')),
    ("name = 'it\\'s'", Compare("name", "=", "it's")),
    ('name = "*@example.com"', Compare("name", "=", "*@example.com")),
    ('name>="m"', Compare("name", ">=", "m")),
    # Enums: case-insensitive, with or without the proto prefix, normalized to the value.
    ("tier = PREMIUM", Compare("tier", "=", "premium")),
    ("tier = TIER_PREMIUM", Compare("tier", "=", "premium")),
    ("tier = premium", Compare("tier", "=", "premium")),
    ('tier != "Tier_Free"', Compare("tier", "!=", "free")),
    ("owner.tier = TIER_FREE", Compare("owner.tier", "=", "free")),
    # Timestamps: RFC 3339, converted to UTC.
    ('create_time > "2024-01-01T00:00:00Z"', Compare("create_time", ">", JAN_1)),
    ('create_time > "2024-01-01T00:00:00z"', Compare("create_time", ">", JAN_1)),
    ('create_time <= "2024-01-01T02:30:00+02:30"', Compare("create_time", "<=", JAN_1)),
    (
        'create_time < "2023-12-31T19:00:00.250-05:00"',
        Compare("create_time", "<", JAN_1 + timedelta(milliseconds=250)),
    ),
    ("active = true", Compare("active", "=", value=True)),
    ("active = FALSE", Compare("active", "=", value=False)),
    ('active != "True"', Compare("active", "!=", value=True)),
    ("count >= 10", Compare("count", ">=", 10)),
    ("count < -3", Compare("count", "<", -3)),
    ("count = '7'", Compare("count", "=", 7)),
    # Precedence: AND binds loosest, then OR, then NOT.
    (
        "count = 1 AND count = 2 AND count = 3",
        And((Compare("count", "=", 1), Compare("count", "=", 2), Compare("count", "=", 3))),
    ),
    (
        "count = 1 OR count = 2 AND count = 3",
        And((Or((Compare("count", "=", 1), Compare("count", "=", 2))), Compare("count", "=", 3))),
    ),
    (
        "count = 1 AND count = 2 OR count = 3",
        And((Compare("count", "=", 1), Or((Compare("count", "=", 2), Compare("count", "=", 3))))),
    ),
    (
        "count = 1 OR (count = 2 AND count = 3)",
        Or((Compare("count", "=", 1), And((Compare("count", "=", 2), Compare("count", "=", 3))))),
    ),
    (
        "NOT active = true OR count = 2",
        Or((Not(Compare("active", "=", value=True)), Compare("count", "=", 2))),
    ),
    ("NOT (count = 1)", Not(Compare("count", "=", 1))),
    ("((count = 1))", Compare("count", "=", 1)),
    (
        "tier = FREE AND NOT (name : x OR active = false)",
        And(
            (
                Compare("tier", "=", "free"),
                Not(Or((Compare("name", ":", "x"), Compare("active", "=", value=False)))),
            )
        ),
    ),
]


@pytest.mark.parametrize(("text", "expected"), VALID_FILTERS)
def test_valid_filter_parses_to_typed_tree(text: str, expected: Expr | None) -> None:
    assert parse_filter(text, FIELDS) == expected


@pytest.mark.parametrize(
    "text",
    [
        'create_time > "2024-01-01T00:00:00Z"',
        'create_time > "2024-01-01T05:30:00+05:30"',
        'create_time > "2023-12-31T16:00:00-08:00"',
    ],
)
def test_timestamps_come_back_in_utc(text: str) -> None:
    node = parse_filter(text, FIELDS)
    assert isinstance(node, Compare)
    assert node.value == JAN_1
    assert node.value.tzinfo is UTC


def test_nesting_and_term_limits_are_inclusive() -> None:
    deepest = "(" * MAX_FILTER_DEPTH + "count = 1" + ")" * MAX_FILTER_DEPTH
    assert parse_filter(deepest, FIELDS) == Compare("count", "=", 1)
    most = " OR ".join(f"count = {i}" for i in range(MAX_FILTER_TERMS))
    parsed = parse_filter(most, FIELDS)
    assert isinstance(parsed, Or)
    assert len(parsed.items) == MAX_FILTER_TERMS
    longest = 'name = "x"'.ljust(MAX_FILTER_LENGTH)
    assert parse_filter(longest, FIELDS) == Compare("name", "=", "x")


# --- parse_filter: invalid ----------------------------------------------------------

INVALID_FILTERS: list[tuple[str, str]] = [
    ('nickname = "x"', "unknown field 'nickname'"),
    ('Name = "x"', "unknown field 'Name'"),
    ("tier > PREMIUM", "operator > does not apply to enum field 'tier'"),
    ("tier : PREMIUM", "operator : does not apply"),
    ("active < true", "operator < does not apply to bool"),
    ("count : 1", "operator : does not apply to int"),
    ('create_time : "2024-01-01T00:00:00Z"', "operator : does not apply to timestamp"),
    ("tier = GOLD", "'tier' must be one of enterprise, free, premium"),
    ("tier = OWNER_PREMIUM", "must be one of"),
    ("active = yes", "must be true or false"),
    ("count = 1.5", "needs an integer"),
    ("count = abc", "needs an integer"),
    ('create_time > "yesterday"', "needs an RFC 3339 timestamp"),
    ('create_time > "2024-01-01T00:00:00"', "needs a time zone offset"),
    ('create_time > "2024-01-01"', "needs a time zone offset"),
    ("create_time > 2024-01-01T00:00:00Z", "unexpected character"),
    # Out of datetime's range once converted to UTC.
    ('create_time > "0001-01-01T00:00:00+01:00"', "needs an RFC 3339 timestamp"),
    ('create_time < "9999-12-31T23:59:59-01:00"', "needs an RFC 3339 timestamp"),
    ('name = "' + "x" * 257 + '"', "longer than 256 characters"),
    ('name = "a\x00b"', "must not contain NUL characters"),
    ('name = "abc', "unexpected character"),
    ("name = 'abc", "unexpected character"),
    ('name = "abc\\"', "unexpected character"),
    ("name =", "expected a value at the end"),
    ("name", "expected an operator at the end"),
    ('name "x"', "expected an operator after 'name'"),
    ("name = = x", "expected a value"),
    ("name = (", "expected a value"),
    ("= x", "expected a field name"),
    ("()", "expected a field name"),
    ("(count = 1", "expected ')' at the end"),
    ("count = 1)", "unexpected ')'"),
    ('name = "a" name = "b"', "unexpected 'name'"),
    ("count = 1 and count = 2", "unexpected 'and'"),
    ("count = 1 AND", "expected a comparison or '(' at the end"),
    ("AND count = 1", "expected a field name"),
    ("NOT NOT count = 1", "expected a field name"),
    ("count = 1 ; DROP TABLE users", "unexpected character"),
    ("name = ☃", "unexpected character"),
    ("(" * (MAX_FILTER_DEPTH + 1) + "count = 1" + ")" * (MAX_FILTER_DEPTH + 1), "nested deeper"),
    (" OR ".join(["count = 1"] * (MAX_FILTER_TERMS + 1)), f"more than {MAX_FILTER_TERMS}"),
    ('name = "x"'.ljust(MAX_FILTER_LENGTH + 1), f"longer than {MAX_FILTER_LENGTH}"),
]


@pytest.mark.parametrize(("text", "message"), INVALID_FILTERS)
def test_invalid_filter_names_the_filter_field(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_filter(text, FIELDS)
    assert violation_field(caught.value) == "filter"
    assert message in caught.value.violations[0].description


def test_no_filterable_fields_refuses_every_filter() -> None:
    with pytest.raises(InvalidArgument, match="filterable fields: none"):
        parse_filter('name = "x"', {})
    assert parse_filter("  ", {}) is None


# --- parse_order_by -----------------------------------------------------------------

VALID_ORDERS: list[tuple[str, tuple[OrderKey, ...]]] = [
    ("", (OrderKey("create_time", descending=True),)),
    ("   ", (OrderKey("create_time", descending=True),)),
    ("name", (OrderKey("name"),)),
    ("name asc", (OrderKey("name"),)),
    ("name desc", (OrderKey("name", descending=True),)),
    ("name DESC", (OrderKey("name", descending=True),)),
    (
        "count desc, name,create_time asc",
        (OrderKey("count", descending=True), OrderKey("name"), OrderKey("create_time")),
    ),
    ("  create_time   desc  ", (OrderKey("create_time", descending=True),)),
]


@pytest.mark.parametrize(("text", "expected"), VALID_ORDERS)
def test_valid_order_by(text: str, expected: tuple[OrderKey, ...]) -> None:
    assert parse_order_by(text, SPEC) == expected


INVALID_ORDERS: list[tuple[str, str]] = [
    ("tier", "cannot order by 'tier'; allowed: count, create_time, name"),
    ("Name", "cannot order by 'Name'"),
    ("name sideways", "use asc or desc, not 'sideways'"),
    ("name asc please", "cannot read 'name asc please'"),
    ("name,", "cannot read ''"),
    (",name", "cannot read ''"),
    ("name, count, name desc", "'name' appears twice"),
]


@pytest.mark.parametrize(("text", "message"), INVALID_ORDERS)
def test_invalid_order_by_names_the_order_by_field(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_order_by(text, SPEC)
    assert violation_field(caught.value) == "order_by"
    assert message in caught.value.violations[0].description


# --- Lister.query: page size, filter and order --------------------------------------


@pytest.mark.parametrize(
    ("page_size", "limit"),
    [(0, 25), (1, 1), (25, 25), (99, 99), (100, 100), (101, 100), (2**31 - 1, 100)],
)
def test_page_size_defaults_and_is_capped(page_size: int, limit: int) -> None:
    assert lister(default=25, maximum=100).query(SPEC, page_size=page_size).limit == limit


@pytest.mark.parametrize("page_size", [-1, -(2**31)])
def test_negative_page_size_is_refused(page_size: int) -> None:
    with pytest.raises(InvalidArgument) as caught:
        lister().query(SPEC, page_size=page_size)
    assert violation_field(caught.value) == "page_size"


def test_query_carries_parsed_filter_and_order() -> None:
    query = lister().query(SPEC, page_size=5, filter="tier = TIER_FREE", order_by="name desc")
    assert query.filter == Compare("tier", "=", "free")
    assert query.order == (OrderKey("name", descending=True),)
    assert query.after is None
    assert lister().query(SPEC, page_size=5).order == SPEC.default_order


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"filter": "bogus = 1"}, "filter"), ({"order_by": "bogus"}, "order_by")],
)
def test_query_reports_the_bad_request_field(kwargs: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        lister().query(SPEC, page_size=5, **kwargs)
    assert violation_field(caught.value) == field


# --- page tokens --------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        (JAN_1, "usr_1"),
        (datetime(2024, 6, 1, 12, 30, 15, 123456, tzinfo=UTC), "usr_2"),
        (42, -7, 0, "id"),
        (2**70, "big"),
        ("ünïcödé ✓", '"quoted" \\ back', ""),
        (None, True, "x"),
    ],
)
def test_codec_round_trips_cursor_values(values: tuple[Any, ...]) -> None:
    codec = PageTokenCodec(b"secret")
    assert codec.decode(codec.encode("fp", values), "fp") == values


def test_codec_returns_datetimes_in_utc() -> None:
    codec = PageTokenCodec(b"secret")
    lisbon_summer = datetime(2024, 7, 1, 13, 0, tzinfo=timezone(timedelta(hours=1)))
    (decoded,) = codec.decode(codec.encode("fp", [lisbon_summer]), "fp")
    assert decoded == lisbon_summer
    assert decoded.utcoffset() == timedelta(0)
    assert decoded.hour == 12


def test_tokens_are_opaque_and_differ_each_time() -> None:
    codec = PageTokenCodec(b"secret")
    first, second = codec.encode("fp", ["usr_visible"]), codec.encode("fp", ["usr_visible"])
    assert first != second
    assert "usr_visible" not in first
    assert "=" not in first


def _flip(token: str, index: int) -> str:
    replacement = "A" if token[index] != "A" else "B"
    return token[:index] + replacement + token[index + 1 :]


@pytest.mark.parametrize("where", ["nonce", "ciphertext", "tag"])
def test_tampered_token_is_refused(where: str) -> None:
    codec = PageTokenCodec(b"secret")
    token = codec.encode("fp", [JAN_1, "usr_1"])
    # Not the last character: its low bits are padding and may not change the bytes.
    index = {"nonce": 3, "ciphertext": len(token) // 2, "tag": len(token) - 5}[where]
    with pytest.raises(InvalidArgument, match="invalid page token") as caught:
        codec.decode(_flip(token, index), "fp")
    assert violation_field(caught.value) == "page_token"


@pytest.mark.parametrize(
    "token", ["", "x", "abc", "!!!!", "not a token", "é" * 40, "A" * 16, "A" * 200]
)
def test_garbage_token_is_refused(token: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        PageTokenCodec(b"secret").decode(token, "fp")
    assert violation_field(caught.value) == "page_token"


def test_token_of_another_secret_is_refused() -> None:
    token = PageTokenCodec(b"one secret").encode("fp", ["x"])
    with pytest.raises(InvalidArgument, match="invalid page token"):
        PageTokenCodec(b"another secret").decode(token, "fp")


def _next_token(source: Lister, **request: str) -> str:
    query = source.query(SPEC, page_size=1, **request)
    page = source.page(query, ["a", "b"], key=lambda _row: (JAN_1, "usr_1"))
    assert page.items == ["a"]
    assert page.next_page_token
    return page.next_page_token


@pytest.mark.parametrize(
    "other",
    [
        {"filter": "count = 2"},
        {"filter": "count = 1 OR count = 2"},
        {"order_by": "create_time asc"},
        {"order_by": "name"},
        {"scope": "users/other"},
    ],
)
def test_token_of_another_filter_order_or_scope_is_refused(other: dict[str, str]) -> None:
    source = lister()
    original = {"filter": "count = 1", "order_by": "create_time desc", "scope": "users/me"}
    token = _next_token(source, **original)
    with pytest.raises(InvalidArgument, match="different filter, order or parent") as caught:
        source.query(SPEC, page_size=1, page_token=token, **{**original, **other})
    assert violation_field(caught.value) == "page_token"


def test_token_is_accepted_with_the_same_request_and_other_page_size() -> None:
    source = lister()
    request = {"filter": " count = 1 ", "order_by": "create_time desc", "scope": "users/me"}
    token = _next_token(source, **request)
    query = source.query(SPEC, page_size=7, page_token=token, **request)
    assert query.after == (JAN_1, "usr_1")
    assert query.limit == 7


def test_token_with_the_wrong_number_of_keys_is_refused() -> None:
    source = lister()
    fingerprint = source.query(SPEC, page_size=1).fingerprint
    short = PageTokenCodec(b"s" * 32).encode(fingerprint, ["usr_1"])
    with pytest.raises(InvalidArgument) as caught:
        source.query(SPEC, page_size=1, page_token=short)
    assert violation_field(caught.value) == "page_token"


# --- Lister.page --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "items", "has_next"),
    [
        ([], [], False),
        ([1], [1], False),
        ([1, 2, 3], [1, 2, 3], False),
        ([1, 2, 3, 4], [1, 2, 3], True),
    ],
)
def test_page_uses_the_extra_row_only_to_know_there_is_more(
    rows: list[int], items: list[int], has_next: bool
) -> None:
    source = lister()
    query = source.query(SPEC, page_size=3)
    page = source.page(query, rows, key=lambda row: (JAN_1, f"id{row}"))
    assert page.items == items
    assert bool(page.next_page_token) is has_next
    if has_next:
        follow = source.query(SPEC, page_size=3, page_token=page.next_page_token)
        assert follow.after == (JAN_1, f"id{items[-1]}")


@pytest.mark.parametrize(
    "raw", ['"1_000"', '"\u0661\u0662"', "99999999999999999999", "-9223372036854775809"]
)
def test_int_filters_take_64_bit_ascii_integers_only(raw: str) -> None:
    fields = {"count": FilterField("int")}
    with pytest.raises(InvalidArgument) as caught:
        parse_filter(f"count = {raw}", fields)
    assert caught.value.violations[0].field == "filter"
    assert parse_filter("count >= -9223372036854775808", fields) == Compare("count", ">=", -(2**63))
