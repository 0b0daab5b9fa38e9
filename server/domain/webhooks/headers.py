"""An endpoint's custom headers: which are allowed, and how an update changes them.

Header values are often credentials (``Authorization``), so they are write-only: stored
sealed, sent with every delivery, and never shown again (responses name the headers only).
An update therefore must not need them back: a mask without ``headers`` keeps them all,
``headers`` replaces them all, and ``headers.<name>`` (AIP-161 map key; backquotes allowed,
names are lower case) sets that one header to the request's value, or removes it when the
request does not carry it, leaving the others as they are.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from server.domain.common.errors import InvalidArgument, Violations

MAX_HEADERS = 20
MAX_HEADER_VALUE = 1000
FIELD = "headers"

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,100}")
_RESERVED = frozenset(
    {
        "host",
        "user-agent",
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)


def check_headers(headers: Mapping[str, str], violations: Violations) -> dict[str, str]:
    """The headers with lower-case names; what is wrong with them goes to ``violations``."""
    if len(headers) > MAX_HEADERS:
        violations.add("webhook.headers", f"at most {MAX_HEADERS} headers")
        return {}
    clean: dict[str, str] = {}
    for name, value in sorted(headers.items()):
        lowered = name.lower()
        where = f"webhook.headers[{name[:100]!r}]"
        if not _TOKEN.fullmatch(name):
            violations.add(where, "a header name is an HTTP token of 1-100 characters")
        elif lowered in _RESERVED or lowered.startswith(("webhook-", "content-")):
            violations.add(where, "this header is set by the sender and cannot be configured")
        elif lowered in clean:
            violations.add(where, "given twice (names are case-insensitive)")
        elif len(value) > MAX_HEADER_VALUE or not all(" " <= c <= "~" for c in value):
            violations.add(
                where, f"a value is printable ASCII of at most {MAX_HEADER_VALUE} characters"
            )
        else:
            clean[lowered] = value
    return clean


def split_paths(paths: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the mask's other paths, the header names of its ``headers.<name>`` paths)."""
    others: list[str] = []
    names: list[str] = []
    for path in paths:
        if not path.startswith(f"{FIELD}."):
            others.append(path)
            continue
        name = path.removeprefix(f"{FIELD}.")
        if len(name) > 2 and name.startswith("`") and name.endswith("`"):
            name = name[1:-1]
        if not _TOKEN.fullmatch(name) or "`" in name:
            raise InvalidArgument.single(
                "update_mask", f"{path[:120]!r}: headers.<name> names one header"
            )
        names.append(name.lower())
    if names and FIELD in others:
        raise InvalidArgument.single(
            "update_mask", "give headers (all of them) or headers.<name> paths, not both"
        )
    return tuple(others), tuple(dict.fromkeys(names))


def merge_headers(
    current: Mapping[str, str], requested: Mapping[str, str], names: Iterable[str]
) -> dict[str, str]:
    """``current`` with each of ``names`` set to its value in ``requested``, or removed
    when ``requested`` does not have it (names compare case-insensitively)."""
    given = {name.lower(): value for name, value in requested.items()}
    merged = dict(current)
    for name in names:
        if name in given:
            merged[name] = given[name]
        else:
            merged.pop(name, None)
    return merged
