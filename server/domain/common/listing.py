"""Generic List support (AIP-132/158/160): page sizes, opaque page tokens, filters, order.

Every List method turns its request into a :class:`ListQuery` with :meth:`Lister.query`
and its fetched rows into a :class:`Page` with :meth:`Lister.page`. Pages are keyset
cursors, not offsets: a token carries the sort key of the last row it returned,
encrypted and authenticated (AES-GCM), and bound to the filter, order and scope it was
made for, so a tampered or reused token is refused with ``INVALID_ARGUMENT``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, Literal, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from server.domain.common.errors import InvalidArgument

T = TypeVar("T")
Kind = Literal["string", "enum", "timestamp", "bool", "int"]
Op = Literal["=", "!=", "<", "<=", ">", ">=", ":"]

MAX_FILTER_LENGTH = 2000
MAX_FILTER_TERMS = 30
MAX_FILTER_DEPTH = 8


@dataclass(frozen=True, slots=True)
class FilterField:
    """A field that filters may name, with its type (and values, for enums)."""

    kind: Kind
    values: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class OrderKey:
    """One sort key."""

    field: str
    descending: bool = False


@dataclass(frozen=True, slots=True)
class ListSpec:
    """What a List method allows: filter fields, order fields and the default order."""

    filter_fields: Mapping[str, FilterField]
    order_fields: frozenset[str]
    default_order: tuple[OrderKey, ...]


# --- filter syntax tree -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Compare:
    """``field op value`` with ``value`` already converted to the field's type."""

    field: str
    op: Op
    value: Any


@dataclass(frozen=True, slots=True)
class And:
    """All of ``items``."""

    items: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Or:
    """Any of ``items``."""

    items: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Not:
    """Not ``item``."""

    item: Expr


Expr = Compare | And | Or | Not


@dataclass(frozen=True, slots=True)
class ListQuery:
    """A validated List request, ready for a repository."""

    limit: int
    order: tuple[OrderKey, ...]
    filter: Expr | None
    after: tuple[Any, ...] | None
    fingerprint: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of results."""

    items: list[T]
    next_page_token: str


# --- filter parsing -----------------------------------------------------------------

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<lparen>\() | (?P<rparen>\)) |
        (?P<op><=|>=|!=|=|<|>|:) |
        (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*') |
        (?P<number>-?\d+(?:\.\d+)?(?![\w.])) |
        (?P<word>[A-Za-z_][A-Za-z0-9_.]*)
    )""",
    re.VERBOSE,
)
_KEYWORDS = {"AND", "OR", "NOT"}


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str
    text: str
    pos: int


def _tokenize(text: str) -> list[_Tok]:
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if not match or match.lastgroup is None:
            raise _filter_error(f"unexpected character at position {pos}")
        start = match.start(match.lastgroup)
        tokens.append(_Tok(match.lastgroup, match.group(match.lastgroup), start))
        pos = match.end()
    return tokens


def _filter_error(description: str) -> InvalidArgument:
    return InvalidArgument.single("filter", description)


class _Parser:
    """Recursive descent over AIP-160: AND binds loosest, then OR, then NOT."""

    def __init__(self, tokens: list[_Tok], fields: Mapping[str, FilterField]) -> None:
        self.tokens = tokens
        self.fields = fields
        self.i = 0
        self.terms = 0

    def parse(self) -> Expr:
        expr = self.expression(0)
        if self.i != len(self.tokens):
            raise _filter_error(f"unexpected {self.tokens[self.i].text!r}")
        return expr

    def peek_keyword(self, word: str) -> bool:
        tok = self.tokens[self.i] if self.i < len(self.tokens) else None
        return tok is not None and tok.kind == "word" and tok.text == word

    def expression(self, depth: int) -> Expr:
        if depth > MAX_FILTER_DEPTH:
            raise _filter_error(f"nested deeper than {MAX_FILTER_DEPTH} levels")
        items = [self.factor(depth)]
        while self.peek_keyword("AND"):
            self.i += 1
            items.append(self.factor(depth))
        return items[0] if len(items) == 1 else And(tuple(items))

    def factor(self, depth: int) -> Expr:
        items = [self.term(depth)]
        while self.peek_keyword("OR"):
            self.i += 1
            items.append(self.term(depth))
        return items[0] if len(items) == 1 else Or(tuple(items))

    def term(self, depth: int) -> Expr:
        if self.peek_keyword("NOT"):
            self.i += 1
            return Not(self.simple(depth))
        return self.simple(depth)

    def simple(self, depth: int) -> Expr:
        tok = self.next("a comparison or '('")
        if tok.kind == "lparen":
            expr = self.expression(depth + 1)
            if self.next("')'").kind != "rparen":
                raise _filter_error(f"expected ')' at position {tok.pos}")
            return expr
        if tok.kind != "word" or tok.text in _KEYWORDS:
            raise _filter_error(f"expected a field name at position {tok.pos}")
        return self.comparison(tok)

    def comparison(self, name: _Tok) -> Compare:
        self.terms += 1
        if self.terms > MAX_FILTER_TERMS:
            raise _filter_error(f"more than {MAX_FILTER_TERMS} comparisons")
        spec = self.fields.get(name.text)
        if spec is None:
            allowed = ", ".join(sorted(self.fields)) or "none"
            raise _filter_error(f"unknown field {name.text!r}; filterable fields: {allowed}")
        op_tok = self.next("an operator")
        if op_tok.kind != "op":
            raise _filter_error(f"expected an operator after {name.text!r}")
        value_tok = self.next("a value")
        if value_tok.kind not in {"string", "number", "word"}:
            raise _filter_error(f"expected a value after {name.text} {op_tok.text}")
        op: Op = op_tok.text  # type: ignore[assignment]
        return Compare(name.text, op, _typed_value(name.text, spec, op, value_tok))

    def next(self, expected: str) -> _Tok:
        if self.i >= len(self.tokens):
            raise _filter_error(f"expected {expected} at the end")
        tok = self.tokens[self.i]
        self.i += 1
        return tok


_OPS_BY_KIND: Mapping[Kind, frozenset[str]] = {
    "string": frozenset({"=", "!=", ":", "<", "<=", ">", ">="}),
    "enum": frozenset({"=", "!="}),
    "bool": frozenset({"=", "!="}),
    "timestamp": frozenset({"=", "!=", "<", "<=", ">", ">="}),
    "int": frozenset({"=", "!=", "<", "<=", ">", ">="}),
}


def _typed_value(name: str, spec: FilterField, op: str, tok: _Tok) -> Any:
    if op not in _OPS_BY_KIND[spec.kind]:
        raise _filter_error(f"operator {op} does not apply to {spec.kind} field {name!r}")
    raw = _unquote(tok.text) if tok.kind == "string" else tok.text
    if spec.kind == "enum":
        return _as_enum(name, spec.values, raw)
    converters: dict[Kind, Callable[[str, str], Any]] = {
        "string": _as_string,
        "bool": _as_bool,
        "timestamp": _as_timestamp,
        "int": _as_int,
    }
    return converters[spec.kind](name, raw)


def _as_string(name: str, raw: str) -> str:
    if len(raw) > 256:
        raise _filter_error(f"value for {name!r} is longer than 256 characters")
    if "\x00" in raw:  # PostgreSQL text cannot hold NUL; no stored value contains one
        raise _filter_error(f"value for {name!r} must not contain NUL characters")
    return raw


def _as_enum(name: str, values: frozenset[str], raw: str) -> str:
    value = raw.lower()
    prefix = name.rsplit(".", 1)[-1] + "_"
    if value not in values and value.startswith(prefix):
        value = value[len(prefix) :]
    if value not in values:
        allowed = ", ".join(sorted(values))
        raise _filter_error(f"{name!r} must be one of {allowed}; got {raw!r}")
    return value


def _as_bool(name: str, raw: str) -> bool:
    if raw.lower() not in {"true", "false"}:
        raise _filter_error(f"{name!r} must be true or false")
    return raw.lower() == "true"


def _as_timestamp(name: str, raw: str) -> datetime:
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise _filter_error(f"{name!r} needs an RFC 3339 timestamp, got {raw!r}") from None
    if value.tzinfo is None:
        raise _filter_error(f"{name!r} timestamp needs a time zone offset, e.g. Z")
    try:
        return value.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 is before year 1 in UTC
        raise _filter_error(f"{name!r} needs an RFC 3339 timestamp, got {raw!r}") from None


_INT = re.compile(r"-?[0-9]{1,19}")


def _as_int(name: str, raw: str) -> int:
    value = int(raw) if _INT.fullmatch(raw) else None
    if value is None or not -(2**63) <= value < 2**63:
        raise _filter_error(f"{name!r} needs an integer (64-bit), got {raw!r}")
    return value


def _unquote(text: str) -> str:
    body = text[1:-1]
    return re.sub(r"\\(.)", r"\1", body)


def parse_filter(text: str, fields: Mapping[str, FilterField]) -> Expr | None:
    """Parse an AIP-160 filter (subset) against the allowed fields; empty means none."""
    if len(text) > MAX_FILTER_LENGTH:
        raise _filter_error(f"longer than {MAX_FILTER_LENGTH} characters")
    if not text.strip():
        return None
    return _Parser(_tokenize(text), fields).parse()


def parse_order_by(text: str, spec: ListSpec) -> tuple[OrderKey, ...]:
    """Parse ``field [asc|desc], ...`` against the allowed fields; empty: the default."""
    if not text.strip():
        return spec.default_order
    keys: list[OrderKey] = []
    for part in text.split(","):
        words = part.split()
        if not words or len(words) > 2:
            raise InvalidArgument.single("order_by", f"cannot read {part.strip()!r}")
        name = words[0]
        direction = words[1].lower() if len(words) == 2 else "asc"
        if name not in spec.order_fields:
            allowed = ", ".join(sorted(spec.order_fields))
            raise InvalidArgument.single(
                "order_by", f"cannot order by {name!r}; allowed: {allowed}"
            )
        if direction not in {"asc", "desc"}:
            raise InvalidArgument.single("order_by", f"use asc or desc, not {words[1]!r}")
        if any(k.field == name for k in keys):
            raise InvalidArgument.single("order_by", f"{name!r} appears twice")
        keys.append(OrderKey(name, direction == "desc"))
    return tuple(keys)


# --- page tokens --------------------------------------------------------------------


class PageTokenCodec:
    """Encrypts and authenticates keyset cursors (AES-256-GCM)."""

    def __init__(self, secret: bytes) -> None:
        self._aead = AESGCM(hashlib.sha256(b"tunnelplane page token v1|" + secret).digest())

    def encode(self, fingerprint: str, values: Sequence[Any]) -> str:
        """A token for the page after the row whose sort key is ``values``."""
        body = json.dumps({"f": fingerprint, "k": [_encode_value(v) for v in values]})
        nonce = os.urandom(12)
        sealed = nonce + self._aead.encrypt(nonce, body.encode(), None)
        return base64.urlsafe_b64encode(sealed).decode().rstrip("=")

    def decode(self, token: str, fingerprint: str) -> tuple[Any, ...]:
        """The cursor in ``token``; refuse a token that is forged or from another query."""
        try:
            sealed = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            body = json.loads(self._aead.decrypt(sealed[:12], sealed[12:], None))
        except (binascii.Error, ValueError, InvalidTag, UnicodeDecodeError):
            raise InvalidArgument.single("page_token", "invalid page token") from None
        if body.get("f") != fingerprint:
            raise InvalidArgument.single(
                "page_token", "page token was made for a different filter, order or parent"
            )
        return tuple(_decode_value(v) for v in body["k"])


def _encode_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"t": value.astimezone(UTC).isoformat()}
    return value


def _decode_value(value: Any) -> Any:
    if isinstance(value, dict):
        return datetime.fromisoformat(value["t"])
    return value


class Lister:
    """Turns List request fields into a :class:`ListQuery` and rows into a :class:`Page`."""

    def __init__(self, codec: PageTokenCodec, default_page_size: int, max_page_size: int) -> None:
        self._codec = codec
        self._default = default_page_size
        self._max = max_page_size

    def query(
        self,
        spec: ListSpec,
        *,
        page_size: int,
        page_token: str = "",
        filter: str = "",  # noqa: A002 - the AIP field is called filter
        order_by: str = "",
        scope: str = "",
    ) -> ListQuery:
        """Validate the request fields; ``scope`` names everything else the results depend on."""
        if page_size < 0:
            raise InvalidArgument.single("page_size", "must not be negative")
        limit = min(page_size or self._default, self._max)
        expr = parse_filter(filter, spec.filter_fields)
        order = parse_order_by(order_by, spec)
        fingerprint = hashlib.sha256(
            json.dumps([filter.strip(), [(k.field, k.descending) for k in order], scope]).encode()
        ).hexdigest()[:32]
        after = self._codec.decode(page_token, fingerprint) if page_token else None
        if after is not None and len(after) != len(order) + 1:
            raise InvalidArgument.single("page_token", "invalid page token")
        return ListQuery(limit, order, expr, after, fingerprint)

    def page(
        self, query: ListQuery, rows: list[T], key: Callable[[T], tuple[Any, ...]] | None = None
    ) -> Page[T]:
        """The page for ``rows`` (fetched with ``limit + 1`` so the next page is known).
        ``key`` gives a row's keyset values; by default, its attributes named like the
        order's fields, then its ``id``."""
        if len(rows) <= query.limit:
            return Page(rows, "")
        items = rows[: query.limit]
        last = items[-1]
        values = (
            key(last)
            if key is not None
            else (*(getattr(last, k.field) for k in query.order), getattr(last, "id"))  # noqa: B009
        )
        return Page(items, self._codec.encode(query.fingerprint, values))
