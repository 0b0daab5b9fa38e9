"""Generic field-mask updates (AIP-134) over nested frozen dataclasses.

A resource's updatable part is a dataclass; an update copies the masked paths from the
requested value onto the current one. :func:`merge` is the same for every resource.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, TypeVar

from server.domain.common.errors import InvalidArgument

T = TypeVar("T")


def check_paths(paths: Iterable[str], allowed: frozenset[str]) -> tuple[str, ...]:
    """Validate mask paths against the updatable ones; ``*`` means every top-level one."""
    paths = list(paths)
    if "*" in paths:
        if len(paths) > 1:
            raise InvalidArgument.single("update_mask", "'*' must be the only path")
        return tuple(sorted(p for p in allowed if "." not in p))
    result: list[str] = []
    for path in paths:
        if path not in allowed:
            updatable = ", ".join(sorted(allowed))
            raise InvalidArgument.single(
                "update_mask", f"{path!r} cannot be updated; updatable paths: {updatable}"
            )
        result.append(path)
    return tuple(dict.fromkeys(result))


def merge(target: T, source: T, paths: Iterable[str]) -> T:
    """``target`` with every dotted path in ``paths`` copied from ``source``."""
    for path in paths:
        target = _set(target, path.split("."), _get(source, path.split(".")))
    return target


def _get(obj: Any, parts: list[str]) -> Any:
    for part in parts:
        obj = getattr(obj, part)
    return obj


def _set(obj: T, parts: list[str], value: Any) -> T:
    head = parts[0]
    if len(parts) == 1:
        return dataclasses.replace(obj, **{head: value})  # type: ignore[type-var]
    child = _set(getattr(obj, head), parts[1:], value)
    return dataclasses.replace(obj, **{head: child})  # type: ignore[type-var]
