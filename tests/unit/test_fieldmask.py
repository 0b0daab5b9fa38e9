"""Field-mask paths and merges over nested dataclasses (server/domain/common/fieldmask.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from server.domain.common.errors import InvalidArgument
from server.domain.common.fieldmask import check_paths, merge


@dataclass(frozen=True, slots=True)
class Notifications:
    email: bool = True
    sms: bool = False


@dataclass(frozen=True, slots=True)
class Prefs:
    language: str = "en"
    time_zone: str = ""
    notifications: Notifications = field(default_factory=Notifications)


@dataclass(frozen=True, slots=True)
class Profile:
    display_name: str = ""
    avatar: str = ""
    prefs: Prefs = field(default_factory=Prefs)


ALLOWED = frozenset(
    {"display_name", "prefs", "prefs.language", "prefs.time_zone", "prefs.notifications.sms"}
)
TARGET = Profile("Ann", "a.png", Prefs("en", "Europe/Lisbon", Notifications(email=True, sms=False)))
SOURCE = Profile(
    "Bea", "b.png", Prefs("pt-BR", "America/Sao_Paulo", Notifications(email=False, sms=True))
)


@pytest.mark.parametrize(
    ("paths", "expected"),
    [
        ([], ()),
        (["display_name"], ("display_name",)),
        (["prefs.language", "display_name"], ("prefs.language", "display_name")),
        (["display_name", "prefs", "display_name"], ("display_name", "prefs")),
        (["prefs.notifications.sms"], ("prefs.notifications.sms",)),
        (["*"], ("display_name", "prefs")),
        (iter(["prefs.time_zone"]), ("prefs.time_zone",)),
    ],
)
def test_check_paths_accepts_updatable_paths(paths: list[str], expected: tuple[str, ...]) -> None:
    assert check_paths(paths, ALLOWED) == expected


@pytest.mark.parametrize(
    "paths",
    [
        ["avatar"],
        ["Display_name"],
        ["display_name", "bogus"],
        ["prefs.notifications"],
        ["prefs.notifications.email"],
        ["prefs."],
        [""],
    ],
)
def test_check_paths_refuses_other_paths(paths: list[str]) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_paths(paths, ALLOWED)
    (violation,) = caught.value.violations
    assert violation.field == "update_mask"
    assert "cannot be updated" in violation.description
    assert "display_name, prefs, prefs.language" in violation.description


@pytest.mark.parametrize("paths", [["bogus", "*"], ["*", "bogus"], ["*", "display_name"]])
def test_star_must_stand_alone(paths: list[str]) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_paths(paths, ALLOWED)
    (violation,) = caught.value.violations
    assert violation.field == "update_mask"
    assert "only path" in violation.description


def test_check_paths_star_with_no_top_level_paths_is_empty() -> None:
    assert check_paths(["*"], frozenset({"prefs.language"})) == ()


@pytest.mark.parametrize(
    ("paths", "expected"),
    [
        ([], TARGET),
        (["display_name"], Profile("Bea", "a.png", TARGET.prefs)),
        (
            ["prefs.language"],
            Profile("Ann", "a.png", Prefs("pt-BR", "Europe/Lisbon", TARGET.prefs.notifications)),
        ),
        (
            ["prefs.notifications.sms"],
            Profile(
                "Ann", "a.png", Prefs("en", "Europe/Lisbon", Notifications(email=True, sms=True))
            ),
        ),
        (["prefs"], Profile("Ann", "a.png", SOURCE.prefs)),
        (["prefs", "prefs.language"], Profile("Ann", "a.png", SOURCE.prefs)),
        (
            ["display_name", "prefs.time_zone"],
            Profile("Bea", "a.png", Prefs("en", "America/Sao_Paulo", TARGET.prefs.notifications)),
        ),
        (["display_name", "avatar", "prefs"], SOURCE),
    ],
)
def test_merge_copies_exactly_the_masked_paths(paths: list[str], expected: Profile) -> None:
    assert merge(TARGET, SOURCE, paths) == expected


def test_merge_leaves_its_inputs_alone() -> None:
    target, source = Profile("Ann"), Profile("Bea", prefs=Prefs("fr"))
    merged = merge(target, source, ["display_name", "prefs.language"])
    assert merged == Profile("Bea", prefs=Prefs("fr"))
    assert target == Profile("Ann")
    assert source == Profile("Bea", prefs=Prefs("fr"))
    assert merge(target, source, []) is target
