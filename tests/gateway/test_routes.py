"""Path templates and the router (TRANSCODING.md "Routing"): the grammar, percent-decoding
of bound values, custom verbs, 404/405, and a property test against a reference matcher."""

from __future__ import annotations

import re
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.routes import (
    DOUBLE_STAR,
    LITERAL,
    STAR,
    Match,
    Router,
    Segment,
    TemplateError,
    Variable,
    parse_template,
)


def lit(text: str) -> Segment:
    return Segment(LITERAL, text)


def parts_of(raw_path: str) -> list[str]:
    return raw_path[1:].split("/")


# --- parse_template ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "segments", "variables", "verb"),
    [
        ("/v1", [lit("v1")], [], ""),
        ("/v1/things", [lit("v1"), lit("things")], [], ""),
        ("/v1/*", [lit("v1"), Segment(STAR)], [], ""),
        ("/v1/**", [lit("v1"), Segment(DOUBLE_STAR)], [], ""),
        ("/v1/{x}", [lit("v1"), Segment(STAR)], [Variable("x", 1, 2)], ""),
        ("/v1/{x=*}", [lit("v1"), Segment(STAR)], [Variable("x", 1, 2)], ""),
        ("/v1/{x=**}", [lit("v1"), Segment(DOUBLE_STAR)], [Variable("x", 1, None)], ""),
        (
            "/v1/{name=things/*}",
            [lit("v1"), lit("things"), Segment(STAR)],
            [Variable("name", 1, 3)],
            "",
        ),
        (
            "/v1/{a.b=foo/*/bar/**}",
            [lit("v1"), lit("foo"), Segment(STAR), lit("bar"), Segment(DOUBLE_STAR)],
            [Variable("a.b", 1, None)],
            "",
        ),
        (
            "/v1/{name=things/*}:frobnicate",
            [lit("v1"), lit("things"), Segment(STAR)],
            [Variable("name", 1, 3)],
            "frobnicate",
        ),
        ("/v1/things:batchGet", [lit("v1"), lit("things")], [], "batchGet"),
        ("/v1/**:undelete", [lit("v1"), Segment(DOUBLE_STAR)], [], "undelete"),
        (
            "/v1/{parent=users/*}/keys/{key}",
            [lit("v1"), lit("users"), Segment(STAR), lit("keys"), Segment(STAR)],
            [Variable("parent", 1, 3), Variable("key", 4, 5)],
            "",
        ),
        (
            "/v1/{string_value}/{nested.name}",
            [lit("v1"), Segment(STAR), Segment(STAR)],
            [Variable("string_value", 1, 2), Variable("nested.name", 2, 3)],
            "",
        ),
        ("/v1/a:b/c", [lit("v1"), lit("a:b"), lit("c")], [], ""),
    ],
)
def test_parse_valid_templates(
    source: str, segments: list[Segment], variables: list[Variable], verb: str
) -> None:
    template = parse_template(source)
    assert template.source == source
    assert list(template.segments) == segments
    assert list(template.variables) == variables
    assert template.verb == verb
    assert template.deep == (segments[-1].kind == DOUBLE_STAR)


@pytest.mark.parametrize(
    "source",
    [
        "",  # no leading slash
        "v1/things",  # no leading slash
        "/",  # no segment
        "/v1//things",  # empty segment
        "/v1/things/",  # trailing slash: empty segment
        "/v1/**/x",  # ** not last
        "/v1/{x=**}/y",  # ** not last, inside a variable
        "/v1/{x",  # unbalanced {
        "/v1/x}",  # unbalanced }
        "/v1/{}",  # empty field path
        "/v1/{1x}",  # field path not an identifier
        "/v1/{a..b}",  # empty field path segment
        "/v1/{x=}",  # empty pattern
        "/v1/{x={y}}",  # nested variable
        "/v1/{x}/{x}",  # field bound twice
        "/v1/a*b",  # * inside a literal
        "/v1/things:",  # empty verb
        "/v1/things:*",  # verb is not a literal
        "/v1/{x=a//b}",  # empty segment inside a variable
    ],
)
def test_parse_invalid_templates(source: str) -> None:
    with pytest.raises(TemplateError):
        parse_template(source)


# --- Template.match ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "raw_path", "expected"),
    [
        # A single-segment variable is fully decoded, %2F included.
        ("/v1/notes/{id}", "/v1/notes/a%2Fb", {"id": "a/b"}),
        ("/v1/notes/{id}", "/v1/notes/a%2fb", {"id": "a/b"}),
        ("/v1/notes/{id}", "/v1/notes/caf%C3%A9%20au%20lait", {"id": "café au lait"}),
        ("/v1/notes/{id}", "/v1/notes/%2541", {"id": "%41"}),  # decoded exactly once
        ("/v1/notes/{id}", "/v1/notes/a+b", {"id": "a+b"}),  # + is not a space in a path
        ("/v1/notes/{id}", "/v1/notes/a:b", {"id": "a:b"}),
        # A multi-segment variable keeps %2F/%2f as sent and decodes the rest.
        ("/v1/{name=things/*}", "/v1/things/a%2Fb", {"name": "things/a%2Fb"}),
        ("/v1/{name=things/*}", "/v1/things/a%2fb%20c", {"name": "things/a%2fb c"}),
        ("/v1/files/{path=**}", "/v1/files/a/b%2Fc/d%20e", {"path": "a/b%2Fc/d e"}),
        ("/v1/files/{path=**}", "/v1/files/x", {"path": "x"}),
        ("/v1/files/{path=**}", "/v1/files", {"path": ""}),
        ("/v1/{a.b=foo/*/bar/**}", "/v1/foo/1/bar/2/3", {"a.b": "foo/1/bar/2/3"}),
        # Literals are compared decoded.
        ("/v1/things", "/v1/%74hings", {}),
        ("/v1/{name=things/*}", "/v1/%74hings/x", {"name": "things/x"}),
        # Several variables.
        ("/v1/{a}/{b}", "/v1/x%2Fy/z", {"a": "x/y", "b": "z"}),
        # No match.
        ("/v1/notes/{id}", "/v1/notes/", None),  # empty segment does not match *
        ("/v1/notes/{id}", "/v1/notes", None),
        ("/v1/notes/{id}", "/v1/notes/a/b", None),
        ("/v1/{name=things/*}", "/v1/things/", None),
        ("/v1/{name=things/*}", "/v1/other/x", None),
        ("/v1/{name=things/*}", "/v1/things%2Fx", None),  # %2F never splits a segment
        ("/v1/things", "/v1/Things", None),
        ("/v1/{a.b=foo/*/bar/**}", "/v1/foo/1/baz/2", None),
        ("/v1/*/x", "/v1//x", None),
    ],
)
def test_template_match_decodes(
    template: str, raw_path: str, expected: dict[str, str] | None
) -> None:
    assert parse_template(template).match(parts_of(raw_path)) == expected


# --- Router -----------------------------------------------------------------------------

ROUTES = [
    ("GET", "/v1/{name=things/*}", "get-thing"),
    ("DELETE", "/v1/{name=things/*}", "delete-thing"),
    ("POST", "/v1/{name=things/*}:frobnicate", "frobnicate"),
    ("GET", "/v1/things:stream", "stream"),
    ("GET", "/v1/{name=things/*}/tags", "tags"),
    ("GET", "/v1/notes/{id}", "note"),
    ("GET", "/v1/files/{path=**}", "file"),
    ("GET", "/v1/echo", "echo-get"),
    ("POST", "/v1/echo", "echo-post"),
    ("GET", "/v1/echo/{a}", "echo-first"),
    ("GET", "/v1/echo/{b}", "echo-second"),
    ("*", "/v1/any", "any-method"),
]


@pytest.fixture(scope="module")
def router() -> Router[str]:
    built: Router[str] = Router()
    for method, template, name in ROUTES:
        built.add(method, parse_template(template), name)
    return built


@pytest.mark.parametrize(
    ("method", "raw_path", "route", "variables"),
    [
        ("GET", "/v1/things/t1", "get-thing", {"name": "things/t1"}),
        ("DELETE", "/v1/things/t1", "delete-thing", {"name": "things/t1"}),
        ("POST", "/v1/things/t1:frobnicate", "frobnicate", {"name": "things/t1"}),
        ("GET", "/v1/things:stream", "stream", {}),
        ("GET", "/v1/things/t1/tags", "tags", {"name": "things/t1"}),
        # No route declares ":b": the colon is data.
        ("GET", "/v1/notes/a:b", "note", {"id": "a:b"}),
        # ":frobnicate" is declared but GET has no such route: the colon falls back to data.
        ("GET", "/v1/notes/x:frobnicate", "note", {"id": "x:frobnicate"}),
        ("GET", "/v1/things/t1:frobnicate", "get-thing", {"name": "things/t1:frobnicate"}),
        ("GET", "/v1/files/a/b/c.txt", "file", {"path": "a/b/c.txt"}),
        ("GET", "/v1/files/a:b", "file", {"path": "a:b"}),
        ("GET", "/v1/echo", "echo-get", {}),
        ("POST", "/v1/echo", "echo-post", {}),
        ("GET", "/v1/echo/x", "echo-first", {"a": "x"}),  # first match in declaration order
        ("PATCH", "/v1/any", "any-method", {}),
        ("GET", "/v1/any", "any-method", {}),
    ],
)
def test_router_matches(
    router: Router[str], method: str, raw_path: str, route: str, variables: dict[str, str]
) -> None:
    found = router.match(method, raw_path)
    assert isinstance(found, Match)
    assert (found.route, found.variables) == (route, variables)


@pytest.mark.parametrize(
    "raw_path",
    ["/v2/things/t1", "/v1/things", "/v1/things/t1/other", "/v1/notes/", "/", "", "/v1/echo/"],
)
def test_router_unknown_path_is_none(router: Router[str], raw_path: str) -> None:
    assert router.match("GET", raw_path) is None


@pytest.mark.parametrize(
    ("method", "raw_path", "allowed"),
    [
        ("PUT", "/v1/things/t1", ["DELETE", "GET"]),
        ("PATCH", "/v1/echo", ["GET", "POST"]),
        ("DELETE", "/v1/things:stream", ["GET"]),
        ("POST", "/v1/notes/n1", ["GET"]),
        ("PUT", "/v1/files/a/b", ["GET"]),
    ],
)
def test_router_wrong_method_lists_allowed(
    router: Router[str], method: str, raw_path: str, allowed: list[str]
) -> None:
    assert router.match(method, raw_path) == allowed


@pytest.mark.parametrize(
    ("declared", "winner"),
    [
        ([("/v1/files/{path=**}", "deep"), ("/v1/files/special", "fixed")], "deep"),
        ([("/v1/files/special", "fixed"), ("/v1/files/{path=**}", "deep")], "fixed"),
        ([("/v1/*/special", "star"), ("/v1/**", "deep"), ("/v1/files/*", "fixed")], "star"),
    ],
)
def test_router_first_match_is_declaration_order_across_shapes(
    declared: list[tuple[str, str]], winner: str
) -> None:
    built: Router[str] = Router()
    for template, name in declared:
        built.add("GET", parse_template(template), name)
    found = built.match("GET", "/v1/files/special")
    assert isinstance(found, Match)
    assert found.route == winner


def test_router_iterates_routes_in_order(router: Router[str]) -> None:
    assert [(m, t.source, r) for m, t, r in router] == ROUTES


# --- Property: Template.match and Router.match against a reference matcher --------------

LITERALS = ("a", "b", "c")
VERBS = ("do", "run")
#: Raw path segments: plain, percent-encoded letters, encoded slashes, empty, colons.
RAW_SEGMENTS = ("a", "b", "c", "%61", "%2F", "a%2fb", "", "%25", "b:c", "c%20d", "x")
#: A literal matches the raw segments that decode to it.
LITERAL_REGEX = {"a": "(?:a|%61)", "b": "b", "c": "c"}

segment_tokens = st.sampled_from([*LITERALS, "*"])
variable_patterns = st.lists(segment_tokens, min_size=1, max_size=3)


def var(name: str, pattern: list[str] | None = None) -> str:
    """``{name}`` or ``{name=a/*/...}``."""
    return "{" + name + ("=" + "/".join(pattern) if pattern else "") + "}"


@st.composite
def templates(draw: st.DrawFn) -> str:
    """Random valid templates: literals, *, variables (single and multi-segment), ** last."""
    tokens: list[str] = []
    names = iter("pqrstuvw")
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["segment", "var", "var-pattern"]))
        if kind == "segment":
            tokens.append(draw(segment_tokens))
        elif kind == "var":
            tokens.append(var(next(names)))
        else:
            tokens.append(var(next(names), draw(variable_patterns)))
    ending = draw(st.sampled_from(["", "**", "var**"]))
    if ending == "**":
        tokens.append("**")
    elif ending == "var**":
        tokens.append(var("z", [*draw(st.lists(segment_tokens, max_size=2)), "**"]))
    verb = draw(st.sampled_from(["", *VERBS]))
    return "/" + "/".join(tokens) + (f":{verb}" if verb else "")


plain_paths = st.lists(st.sampled_from(RAW_SEGMENTS), min_size=1, max_size=7).map(
    lambda parts: "/" + "/".join(parts)
)
raw_paths = st.builds(
    lambda path, verb: path + (f":{verb}" if verb else ""),
    plain_paths,
    st.sampled_from(["", "", *VERBS, "zz"]),
)


def _split_top(body: str) -> list[str]:
    """``/``-separated tokens of a template body, braces kept whole."""
    return re.findall(r"\{[^}]*\}|[^/]+", body)


def _segments_regex(tokens: list[str]) -> str:
    """Each token as ``/<segment>``; ``**`` as zero or more segments."""
    regex = {"*": "/[^/]+", "**": "(?:/[^/]*)*"}
    return "".join(regex.get(t) or "/" + LITERAL_REGEX[t] for t in tokens)


def reference_regex(template: str) -> tuple[re.Pattern[str], dict[str, bool]]:
    """The template (verb ignored) as a regex over the raw path, and for each variable
    whether it may span several segments."""
    body = template[1:].partition(":")[0]
    pattern, multi = "", {}
    for token in _split_top(body):
        if token.startswith("{"):
            name, _, sub = token[1:-1].partition("=")
            sub_tokens = sub.split("/") if sub else ["*"]
            multi[name] = len(sub_tokens) > 1 or sub_tokens[-1] == "**"
            pattern += f"(?P<{name}>{_segments_regex(sub_tokens)})"
        else:
            pattern += _segments_regex([token])
    return re.compile(pattern + r"\Z"), multi


def reference_decode(raw: str, *, multi: bool) -> str:
    """Decode once; a multi-segment value keeps ``%2F``/``%2f`` as sent."""
    if not multi:
        return unquote(raw)
    keep = raw.replace("%2F", "\x00U").replace("%2f", "\x00L")
    return unquote(keep).replace("\x00U", "%2F").replace("\x00L", "%2f")


def reference_match(template: str, raw_path: str) -> dict[str, str] | None:
    """Variable values if ``raw_path`` (no verb) matches ``template`` (verb ignored)."""
    regex, multi = reference_regex(template)
    found = regex.match(raw_path)
    if found is None:
        return None
    # Each group starts with the "/" before its first segment.
    return {
        name: reference_decode(raw[1:], multi=multi[name])
        for name, raw in found.groupdict("").items()
    }


@settings(max_examples=300, deadline=None)
@given(template=templates(), raw_path=plain_paths)
def test_template_match_agrees_with_reference(template: str, raw_path: str) -> None:
    assert parse_template(template).match(parts_of(raw_path)) == reference_match(template, raw_path)


def reference_router(templates_: list[str], raw_path: str) -> tuple[int, dict[str, str]] | None:
    """The spec's rule: ``:suffix`` is a verb if some route declares it (then try it first);
    otherwise, or if nothing matches with it, the colon is data; first declared route wins."""
    declared = {parse_template(t).verb for t in templates_} - {""}
    candidates = []
    last = raw_path.rsplit("/", 1)[-1]
    if ":" in last and last.rsplit(":", 1)[1] in declared:
        head, _, verb = raw_path.rpartition(":")
        candidates.append((head, verb))
    candidates.append((raw_path, ""))
    for path, verb in candidates:
        for index, template in enumerate(templates_):
            if parse_template(template).verb != verb:
                continue
            values = reference_match(template, path)
            if values is not None:
                return index, values
    return None


ANY_SEGMENT = st.sampled_from(RAW_SEGMENTS)
NON_EMPTY_SEGMENT = st.sampled_from([s for s in RAW_SEGMENTS if s])


@st.composite
def instances(draw: st.DrawFn, template: str) -> str:
    """A raw path that ``template`` matches (literals sometimes percent-encoded)."""
    body, _, verb = template[1:].partition(":")
    parts: list[str] = []
    for token in re.sub(r"\{[^=}]*=?([^}]*)\}", lambda m: m.group(1) or "*", body).split("/"):
        if token == "**":
            parts += draw(st.lists(ANY_SEGMENT, max_size=2))
        elif token == "*":
            parts.append(draw(NON_EMPTY_SEGMENT))
        else:
            parts.append(draw(st.sampled_from([token, "%61"] if token == "a" else [token])))
    return "/" + "/".join(parts) + (f":{verb}" if verb else "")


@settings(max_examples=400, deadline=None)
@given(templates_=st.lists(templates(), min_size=1, max_size=4), data=st.data())
def test_router_agrees_with_reference(templates_: list[str], data: st.DataObject) -> None:
    target = data.draw(st.sampled_from(templates_))
    raw_path = data.draw(st.one_of(raw_paths, instances(target)))
    built: Router[int] = Router()
    for index, template in enumerate(templates_):
        built.add("GET", parse_template(template), index)
    found = built.match("GET", raw_path)
    expected = reference_router(templates_, raw_path)
    if expected is None:
        assert found is None
    else:
        assert isinstance(found, Match)
        assert (found.route, found.variables) == expected
        assert built.match("POST", raw_path) == ["GET"]
