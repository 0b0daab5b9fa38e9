"""Laws of field-mask merges: all paths give the source, none the target, and a merge is
idempotent and touches nothing outside its paths."""

from __future__ import annotations

import random
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from server.domain.common.fieldmask import check_paths, merge


@dataclass(frozen=True, slots=True)
class Inner:
    flag: bool
    count: int


@dataclass(frozen=True, slots=True)
class Middle:
    label: str
    inner: Inner


@dataclass(frozen=True, slots=True)
class Outer:
    name: str
    middle: Middle
    extra: int


LEAVES = ("name", "middle.label", "middle.inner.flag", "middle.inner.count", "extra")
ALLOWED = frozenset({*LEAVES, "middle", "middle.inner"})

values = st.builds(
    Outer,
    name=st.text(max_size=5),
    middle=st.builds(
        Middle,
        label=st.text(max_size=5),
        inner=st.builds(Inner, flag=st.booleans(), count=st.integers()),
    ),
    extra=st.integers(),
)
masks = st.lists(st.sampled_from(sorted(ALLOWED)), max_size=8)


def value_at(obj: object, path: str) -> object:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def covered(leaf: str, paths: list[str]) -> bool:
    return any(leaf == path or leaf.startswith(path + ".") for path in paths)


@given(target=values, source=values)
def test_every_path_gives_the_source(target: Outer, source: Outer) -> None:
    assert merge(target, source, LEAVES) == source
    assert merge(target, source, check_paths(["*"], ALLOWED)) == source


@given(target=values, source=values)
def test_no_path_gives_the_target(target: Outer, source: Outer) -> None:
    assert merge(target, source, []) == target


@given(target=values, source=values, paths=masks)
def test_merge_is_idempotent(target: Outer, source: Outer, paths: list[str]) -> None:
    once = merge(target, source, paths)
    assert merge(once, source, paths) == once


@given(target=values, source=values, paths=masks)
def test_each_leaf_comes_from_source_iff_the_mask_covers_it(
    target: Outer, source: Outer, paths: list[str]
) -> None:
    merged = merge(target, source, paths)
    for leaf in LEAVES:
        origin = source if covered(leaf, paths) else target
        assert value_at(merged, leaf) == value_at(origin, leaf)


@given(target=values, source=values, paths=masks, seed=st.randoms())
def test_path_order_does_not_matter(
    target: Outer, source: Outer, paths: list[str], seed: random.Random
) -> None:
    shuffled = list(paths)
    seed.shuffle(shuffled)
    assert merge(target, source, shuffled) == merge(target, source, paths)
