"""HTTP rules -> compiled path templates, and the router that matches requests to them.

Template grammar (``google/api/http.proto``)::

    Template = "/" Segments [ Verb ] ;
    Segments = Segment { "/" Segment } ;
    Segment  = "*" | "**" | LITERAL | Variable ;
    Variable = "{" FieldPath [ "=" Segments ] "}" ;
    Verb     = ":" LITERAL ;

A raw path is split on ``/`` first and each piece is percent-decoded exactly once: a
variable that spans one segment is fully decoded (``%2F`` becomes ``/``), one that can span
several keeps ``%2F`` as it is. ``:verb`` is a custom verb only when some route declares
that verb; otherwise the colon is part of the data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar
from urllib.parse import unquote

T = TypeVar("T")

LITERAL, STAR, DOUBLE_STAR = "literal", "*", "**"
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_RESERVED_SLASH = re.compile(r"%2[Ff]")


class TemplateError(ValueError):
    """A path template that does not follow the grammar."""


@dataclass(frozen=True, slots=True)
class Segment:
    """One segment of a template: a literal, ``*`` or ``**``."""

    kind: str
    text: str = ""


@dataclass(frozen=True, slots=True)
class Variable:
    """A field bound to the segments ``start:end`` (``end`` None: to the end, for ``**``)."""

    field_path: str
    start: int
    end: int | None

    @property
    def multi_segment(self) -> bool:
        """Whether the value may contain ``/`` (then ``%2F`` stays encoded)."""
        return self.end is None or self.end - self.start > 1


@dataclass(frozen=True, slots=True)
class Template:
    """A compiled path template."""

    source: str
    segments: tuple[Segment, ...]
    variables: tuple[Variable, ...]
    verb: str = ""

    @property
    def deep(self) -> bool:
        """Whether the template ends in ``**`` (matches any number of segments)."""
        return bool(self.segments) and self.segments[-1].kind == DOUBLE_STAR

    def match(self, parts: Sequence[str]) -> dict[str, str] | None:
        """Variable values if the raw path ``parts`` match, else ``None``."""
        segments = self.segments
        if self.deep:
            if len(parts) < len(segments) - 1:
                return None
        elif len(parts) != len(segments):
            return None
        for segment, part in zip(segments, parts, strict=False):
            if segment.kind == LITERAL and unquote(part) != segment.text:
                return None
            if segment.kind == STAR and part == "":
                return None
        values: dict[str, str] = {}
        for variable in self.variables:
            raw = parts[variable.start : variable.end]
            if variable.multi_segment:
                values[variable.field_path] = "/".join(_decode_keeping_slashes(p) for p in raw)
            else:
                values[variable.field_path] = unquote(raw[0])
        return values


def _decode_keeping_slashes(part: str) -> str:
    pieces = _RESERVED_SLASH.split(part)
    slashes = _RESERVED_SLASH.findall(part)
    out = unquote(pieces[0])
    for slash, piece in zip(slashes, pieces[1:], strict=True):
        out += slash + unquote(piece)
    return out


def parse_template(source: str) -> Template:
    """Compile a template; :class:`TemplateError` if it breaks the grammar."""
    if not source.startswith("/"):
        raise TemplateError(f"{source!r}: a template starts with /")
    body, verb = _split_verb(source[1:])
    segments: list[Segment] = []
    variables: list[Variable] = []
    for token in _tokens(body, source):
        if token.startswith("{"):
            variables.append(_variable(token, len(segments), segments, source))
        else:
            segments.append(_segment(token, source))
    if any(s.kind == DOUBLE_STAR for s in segments[:-1]):
        raise TemplateError(f"{source!r}: ** may only be the last segment")
    names = [v.field_path for v in variables]
    if len(set(names)) != len(names):
        raise TemplateError(f"{source!r}: a field is bound twice")
    return Template(source, tuple(segments), tuple(variables), verb)


def _split_verb(body: str) -> tuple[str, str]:
    last = body.rsplit("/", 1)[-1]
    if ":" in last and "}" not in last[last.rfind(":") :]:
        head, _, verb = body.rpartition(":")
        if not verb or any(c in verb for c in "{}*"):
            raise TemplateError(f"/{body}: the verb must be a literal")
        return head, verb
    return body, ""


def _tokens(body: str, source: str) -> list[str]:
    """Split on ``/`` outside braces."""
    tokens, depth, current = [], 0, ""
    for char in body:
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth < 0:
                raise TemplateError(f"{source!r}: unbalanced }}")
        if char == "/" and depth == 0:
            tokens.append(current)
            current = ""
        else:
            current += char
    if depth:
        raise TemplateError(f"{source!r}: unbalanced {{")
    tokens.append(current)
    return tokens


def _segment(token: str, source: str) -> Segment:
    if token in {STAR, DOUBLE_STAR}:
        return Segment(token)
    if not token or any(c in token for c in "{}*"):
        raise TemplateError(f"{source!r}: bad segment {token!r}")
    return Segment(LITERAL, token)


def _variable(token: str, start: int, segments: list[Segment], source: str) -> Variable:
    inner = token[1:-1]
    field_path, has_pattern, pattern = inner.partition("=")
    if not _IDENT.match(field_path):
        raise TemplateError(f"{source!r}: bad field path {field_path!r}")
    sub = [_segment(t, source) for t in pattern.split("/")] if has_pattern else [Segment(STAR)]
    segments.extend(sub)
    end = None if sub[-1].kind == DOUBLE_STAR else start + len(sub)
    return Variable(field_path, start, end)


@dataclass(slots=True)
class Match(Generic[T]):
    """A matched route with its path variable values."""

    route: T
    variables: dict[str, str]


@dataclass(slots=True)
class _Entry(Generic[T]):
    method: str
    template: Template
    route: T
    order: int


@dataclass
class Router(Generic[T]):
    """Matches (method, raw path) to the first route that fits, in declaration order."""

    _entries: list[_Entry[T]] = field(default_factory=list)
    _verbs: set[str] = field(default_factory=set)
    _by_shape: dict[tuple[int, str], list[_Entry[T]]] = field(default_factory=dict)
    _deep: list[_Entry[T]] = field(default_factory=list)
    _merged: dict[tuple[int, str], list[_Entry[T]]] = field(default_factory=dict)

    def add(self, method: str, template: Template, route: T) -> None:
        """Register ``route`` for ``method`` (upper case; ``*`` for any) and ``template``."""
        entry = _Entry(method, template, route, len(self._entries))
        self._entries.append(entry)
        self._merged.clear()
        if template.verb:
            self._verbs.add(template.verb)
        if template.deep:
            self._deep.append(entry)
        else:
            key = (len(template.segments), template.verb)
            self._by_shape.setdefault(key, []).append(entry)

    def match(self, method: str, raw_path: str) -> Match[T] | list[str] | None:
        """The match; ``None`` for an unknown path; the allowed methods for a known path
        requested with the wrong method (answer 405 with ``Allow``)."""
        allowed: list[str] = []
        for parts, verb in self._candidates(raw_path):
            for entry in self._entries_for(len(parts), verb):
                variables = entry.template.match(parts)
                if variables is None:
                    continue
                if entry.method in {method, "*"}:
                    return Match(entry.route, variables)
                allowed.append(entry.method)
        return sorted(set(allowed)) or None

    def _candidates(self, raw_path: str) -> Iterable[tuple[list[str], str]]:
        parts = raw_path[1:].split("/") if raw_path.startswith("/") else raw_path.split("/")
        last = parts[-1]
        if ":" in last:
            head, _, verb = last.rpartition(":")
            if verb in self._verbs:
                yield [*parts[:-1], head], verb
        yield parts, ""

    def _entries_for(self, count: int, verb: str) -> list[_Entry[T]]:
        # Fixed-length and ``**`` routes interleaved as declared: the first declared wins.
        # The merged list per shape is made once; a path longer than any route gets none.
        key = (count, verb)
        found = self._merged.get(key)
        if found is None:
            deep = [e for e in self._deep if e.template.verb == verb]
            found = sorted([*self._by_shape.get(key, ()), *deep], key=lambda e: e.order)
            if len(self._merged) < 4096:  # bounded: a client picks the counts
                self._merged[key] = found
        return found

    def __iter__(self) -> Iterable[tuple[str, Template, T]]:
        for entry in self._entries:
            yield entry.method, entry.template, entry.route
