"""Laws of the list layer: keyset paging in SQL equals a reference sort, filters print and
parse back, tokens round trip and resist tampering, and no text crashes the parser."""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from operator import attrgetter
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from server.domain.common.errors import InvalidArgument
from server.domain.common.listing import (
    MAX_FILTER_DEPTH,
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
)
from server.storage.query import apply_list_query
from server.storage.tables import UTCDateTime

# --- keyset paging: SQL against a pure-Python reference -----------------------------


@dataclass(frozen=True, slots=True)
class Row:
    id: str
    name: str
    score: int
    created: datetime


SPEC = ListSpec(
    filter_fields={"score": FilterField("int")},
    order_fields=frozenset({"name", "score", "created"}),
    default_order=(OrderKey("created", descending=True),),
)
_metadata = sa.MetaData()
ROWS = sa.Table(
    "rows",
    _metadata,
    sa.Column("id", sa.String(10), primary_key=True),
    sa.Column("name", sa.String(10), nullable=False),
    sa.Column("score", sa.Integer(), nullable=False),
    sa.Column("created", UTCDateTime(), nullable=False),
)
COLUMNS = {"name": ROWS.c.name, "score": ROWS.c.score, "created": ROWS.c.created}
BASE = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
# Few distinct values, so that ties on every key (and the id tie-breaker) are common.
NAMES = ["", "a", "ab", "b", "B", "z", "é"]
TIMES = [
    BASE,
    BASE + timedelta(microseconds=1),
    BASE + timedelta(days=1),
    BASE - timedelta(days=400),
]

rows_strategy = st.lists(
    st.text(alphabet="abcXYZ019_", min_size=1, max_size=5), unique=True, max_size=25
).flatmap(
    lambda ids: st.tuples(
        *(
            st.builds(
                Row,
                id=st.just(i),
                name=st.sampled_from(NAMES),
                score=st.integers(-2, 2),
                created=st.sampled_from(TIMES),
            )
            for i in ids
        )
    ).map(list)
)
order_strategy = st.lists(
    st.tuples(st.sampled_from(["name", "score", "created"]), st.booleans()),
    unique_by=lambda key: key[0],
    max_size=3,
).map(lambda keys: tuple(OrderKey(name, desc) for name, desc in keys))


def sort_key(row: Row, order: tuple[OrderKey, ...]) -> tuple[Any, ...]:
    return (*(getattr(row, key.field) for key in order), row.id)


def is_after(values: tuple[Any, ...], cursor: tuple[Any, ...], descending: list[bool]) -> bool:
    """Whether a row with sort key ``values`` comes strictly after ``cursor``."""
    for value, bound, desc in zip(values, cursor, descending, strict=True):
        if value != bound:
            return bool(value < bound) if desc else bool(value > bound)
    return False


def reference_sort(rows: list[Row], order: tuple[OrderKey, ...]) -> list[Row]:
    """Stable sorts from the last key to the first; ``id`` ascending breaks ties."""
    result = sorted(rows, key=attrgetter("id"))
    for key in reversed(order):
        result = sorted(result, key=attrgetter(key.field), reverse=key.descending)
    return result


def reference_page(
    rows: list[Row], order: tuple[OrderKey, ...], cursor: tuple[Any, ...] | None, limit: int
) -> list[Row]:
    descending = [key.descending for key in order] + [False]
    ordered = reference_sort(rows, order)
    if cursor is not None:
        ordered = [row for row in ordered if is_after(sort_key(row, order), cursor, descending)]
    return ordered[:limit]


def order_by_text(order: tuple[OrderKey, ...]) -> str:
    return ", ".join(f"{key.field} {'desc' if key.descending else 'asc'}" for key in order)


@pytest.fixture(scope="module")
def sqlite() -> Iterator[sa.Engine]:
    engine = sa.create_engine("sqlite://")
    _metadata.create_all(engine)
    yield engine
    engine.dispose()


def fetch_all_pages(
    conn: sa.Connection, lister: Lister, request: dict[str, Any], rows: list[Row]
) -> list[list[Row]]:
    """Page through the table like a client; check each page against the reference."""
    pages: list[list[Row]] = []
    token = ""
    while True:
        query = lister.query(SPEC, page_token=token, **request)
        stmt = apply_list_query(sa.select(ROWS), query, COLUMNS, ROWS.c.id)
        fetched = [Row(**row) for row in conn.execute(stmt).mappings()]
        page = lister.page(query, fetched, key=lambda row: sort_key(row, query.order))
        assert page.items == reference_page(rows, query.order, query.after, query.limit)
        pages.append(page.items)
        if not page.next_page_token:
            return pages
        token = page.next_page_token


@settings(max_examples=120, deadline=None)
@given(
    rows=rows_strategy,
    order=order_strategy,
    page_size=st.integers(1, 30),
    min_score=st.none() | st.integers(-2, 2),
)
def test_sql_keyset_paging_equals_reference_sort(
    sqlite: sa.Engine,
    rows: list[Row],
    order: tuple[OrderKey, ...],
    page_size: int,
    min_score: int | None,
) -> None:
    lister = Lister(PageTokenCodec(b"k" * 32), default_page_size=10, max_page_size=30)
    request = {
        "page_size": page_size,
        "order_by": order_by_text(order),
        "filter": "" if min_score is None else f"score >= {min_score}",
        "scope": "rows",
    }
    wanted = [row for row in rows if min_score is None or row.score >= min_score]
    with sqlite.begin() as conn:
        conn.execute(ROWS.delete())
        if rows:
            conn.execute(ROWS.insert(), [vars_of(row) for row in rows])
        pages = fetch_all_pages(conn, lister, request, wanted)
    effective_order = order or SPEC.default_order
    assert [row for page in pages for row in page] == reference_sort(wanted, effective_order)
    assert all(len(page) == page_size for page in pages[:-1])
    assert len(pages) == max(1, -(-len(wanted) // page_size))


def vars_of(row: Row) -> dict[str, Any]:
    return {"id": row.id, "name": row.name, "score": row.score, "created": row.created}


@settings(max_examples=150)
@given(rows=rows_strategy, order=order_strategy)
def test_reference_is_after_agrees_with_reference_sort(
    rows: list[Row], order: tuple[OrderKey, ...]
) -> None:
    descending = [key.descending for key in order] + [False]
    keys = [sort_key(row, order) for row in reference_sort(rows, order)]
    for i, earlier in enumerate(keys):
        for later in keys[i + 1 :]:
            assert is_after(later, earlier, descending)
            assert not is_after(earlier, later, descending)
        assert not is_after(earlier, earlier, descending)


# --- filters: print, parse back -----------------------------------------------------

FIELDS = {
    "name": FilterField("string"),
    "tier": FilterField("enum", frozenset({"free", "premium", "enterprise"})),
    "create_time": FilterField("timestamp"),
    "active": FilterField("bool"),
    "count": FilterField("int"),
}
_ALL_OPS = ["=", "!=", "<", "<=", ">", ">="]


def naive(year: int) -> datetime:
    """A bound for ``st.datetimes``, which takes naive bounds."""
    return datetime(year, 1, 1, tzinfo=UTC).replace(tzinfo=None)


offsets = st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
timestamps = st.datetimes(min_value=naive(1971), max_value=naive(2200), timezones=offsets)


@st.composite
def comparisons(draw: st.DrawFn) -> tuple[Compare, str]:
    """A comparison and one of the ways to write it."""
    field = draw(st.sampled_from(sorted(FIELDS)))
    if field == "name":
        op = draw(st.sampled_from([*_ALL_OPS, ":"]))
        # NUL is refused on purpose: PostgreSQL text cannot hold it.
        chars = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
        value: Any = draw(st.text(chars, max_size=40))
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return Compare(field, op, value), f'{field} {op} "{escaped}"'
    if field == "tier":
        op, value = draw(st.sampled_from(["=", "!="])), draw(st.sampled_from(["free", "premium"]))
        text = draw(st.sampled_from([value, value.upper(), f"TIER_{value.upper()}", f"'{value}'"]))
        return Compare(field, op, value), f"{field} {op} {text}"
    if field == "create_time":
        op, value = draw(st.sampled_from(_ALL_OPS)), draw(timestamps)
        return Compare(field, op, value.astimezone(UTC)), f'{field} {op} "{value.isoformat()}"'
    if field == "active":
        op, value = draw(st.sampled_from(["=", "!="])), draw(st.booleans())
        text = draw(st.sampled_from([str(value).lower(), str(value).upper()]))
        return Compare(field, op, value), f"{field} {op} {text}"
    op, value = draw(st.sampled_from(_ALL_OPS)), draw(st.integers(-(10**12), 10**12))
    return Compare(field, op, value), f"{field}{op}{value}"


def _render(node: tuple[Expr, str, int], *, parenthesize: bool) -> tuple[str, int]:
    expr, text, depth = node
    if parenthesize and not isinstance(expr, Compare | Not):
        return f"({text})", depth + 1
    return text, depth


def _combine(children: st.SearchStrategy[tuple[Expr, str, int]]) -> st.SearchStrategy[Any]:
    def join(kind: type[And] | type[Or], parts: list[tuple[Expr, str, int]]) -> Any:
        rendered = [_render(part, parenthesize=True) for part in parts]
        keyword = " AND " if kind is And else " OR "
        text = keyword.join(t for t, _ in rendered)
        return kind(tuple(p[0] for p in parts)), text, max(d for _, d in rendered)

    def negate(part: tuple[Expr, str, int]) -> Any:
        text, depth = _render(part, parenthesize=not isinstance(part[0], Compare))
        if isinstance(part[0], Not):
            text, depth = f"({text})", depth + 1
        return Not(part[0]), f"NOT {text}", depth

    pairs = st.lists(children, min_size=2, max_size=3)
    return st.one_of(
        pairs.map(lambda parts: join(And, parts)),
        pairs.map(lambda parts: join(Or, parts)),
        children.map(negate),
    )


filters = st.recursive(
    comparisons().map(lambda pair: (pair[0], pair[1], 0)), _combine, max_leaves=12
)


def _terms(expr: Expr) -> int:
    if isinstance(expr, Compare):
        return 1
    if isinstance(expr, Not):
        return _terms(expr.item)
    return sum(_terms(item) for item in expr.items)


@settings(max_examples=300)
@given(filters)
def test_printed_filter_parses_back_to_the_same_tree(node: tuple[Expr, str, int]) -> None:
    expr, text, depth = node
    assume(depth <= MAX_FILTER_DEPTH and _terms(expr) <= MAX_FILTER_TERMS)
    parsed = parse_filter(text, FIELDS)
    assert parsed == expr
    for compare in _compares(parsed):
        if isinstance(compare.value, datetime):
            assert compare.value.utcoffset() == timedelta(0)


def _compares(expr: Expr | None) -> Iterator[Compare]:
    if isinstance(expr, Compare):
        yield expr
    elif isinstance(expr, Not):
        yield from _compares(expr.item)
    elif isinstance(expr, And | Or):
        for item in expr.items:
            yield from _compares(item)


# --- filters: no input crashes the parser or takes long -----------------------------

_PIECES = [
    "name", "tier", "create_time", "active", "count", "bogus", "a.b", "AND", "OR", "NOT",
    "and", "(", ")", "=", "!=", "<", "<=", ">", ">=", ":", '"', "'", "\\", '"x"', "'y'",
    "PREMIUM", "TIER_FREE", "true", "1", "-2", "1.5", "9" * 30, '"2024-01-01T00:00:00Z"',
    '"0001-01-01T00:00:00+01:00"', '"9999-12-31T23:59:59-14:00"', "*", ",", ";", "\n", "\x00",
    "é", "٣",
]  # fmt: skip
filter_like = st.one_of(
    st.text(max_size=200),
    st.lists(st.sampled_from(_PIECES), max_size=40).map(" ".join),
    st.lists(st.sampled_from(_PIECES), max_size=40).map("".join),
)


def _parse_or_refuse(text: str) -> None:
    try:
        result = parse_filter(text, FIELDS)
    except InvalidArgument as exc:
        assert [v.field for v in exc.violations] == ["filter"]
    else:
        assert result is None or isinstance(result, Compare | And | Or | Not)


@settings(max_examples=600)
@given(filter_like)
def test_parser_only_ever_refuses_with_invalid_argument(text: str) -> None:
    _parse_or_refuse(text)


@pytest.mark.parametrize(
    "text",
    [
        '"' + "\\x" * 999,
        "'" + "a" * 1999,
        "(" * 2000,
        "NOT " * 500,
        " OR ".join(["count = 1"] * 180),
        "count = 1 AND " * 140,
        " " * 1999 + "(",
        "a" * 2000,
        "9" * 2000,
        'name = "' + "\\" * 1990 + '"',
    ],
)
def test_parser_is_fast_on_hostile_input(text: str) -> None:
    # This process's CPU time, not the wall clock: other processes on a busy machine do not
    # count, and a parser that backtracks takes seconds of its own.
    started = time.process_time()
    _parse_or_refuse(text)
    assert time.process_time() - started < 0.5


# --- page tokens ---------------------------------------------------------------------

cursor_values = st.lists(
    st.one_of(
        st.datetimes(min_value=naive(2), max_value=naive(9998), timezones=offsets),
        st.integers(),
        st.text(),
        st.booleans(),
        st.none(),
    ),
    max_size=5,
)


@settings(max_examples=200)
@given(values=cursor_values, fingerprint=st.text(max_size=40))
def test_page_token_round_trips(values: list[Any], fingerprint: str) -> None:
    codec = PageTokenCodec(b"secret")
    decoded = codec.decode(codec.encode(fingerprint, values), fingerprint)
    assert decoded == tuple(values)
    for value in decoded:
        if isinstance(value, datetime):
            assert value.utcoffset() == timedelta(0)


def _raw(token: str) -> bytes | None:
    try:
        return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        return None


@settings(max_examples=300)
@given(st.data())
def test_any_changed_token_is_refused(data: st.DataObject) -> None:
    codec = PageTokenCodec(b"secret")
    token = codec.encode("fp", data.draw(cursor_values))
    index = data.draw(st.integers(0, len(token) - 1))
    char = data.draw(st.characters(codec="ascii").filter(lambda c: c != token[index]))
    changed = token[:index] + char + token[index + 1 :]
    # Base64 ignores the low padding bits of the last character: the same token in disguise.
    assume(_raw(changed) != _raw(token))
    with pytest.raises(InvalidArgument) as caught:
        codec.decode(changed, "fp")
    assert [v.field for v in caught.value.violations] == ["page_token"]
