"""Input rules shared by the domain services (server/domain/common/validation.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from server.domain.common import validation
from server.domain.common.errors import FieldViolation, InvalidArgument, Violations


def recorded(collected: Violations) -> list[FieldViolation]:
    """What a collector holds, read through the exception it raises."""
    if not collected:
        return []
    with pytest.raises(InvalidArgument) as caught:
        collected.raise_if_any()
    return caught.value.violations


def violations_of(check: Callable[..., object], *args: str) -> tuple[object, list[FieldViolation]]:
    """Run a rule on a fresh collector; return its result and what it recorded."""
    collected = Violations()
    result = check(*args, collected)
    return result, recorded(collected)


# --- email -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "cleaned"),
    [
        ("ann@example.com", "ann@example.com"),
        ("Ann.Lee@Example.COM", "ann.lee@example.com"),
        ("a+tag@sub.example.co.uk", "a+tag@sub.example.co.uk"),
        ("o'brien@example.ie", "o'brien@example.ie"),
        ("x@a-b.io", "x@a-b.io"),
        ("1@2.example", "1@2.example"),
        ("a" * 64 + "@example.com", "a" * 64 + "@example.com"),
        ("a@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 63 + "." + "e" * 57, None),
    ],
)
def test_valid_email_is_lower_cased(value: str, cleaned: str | None) -> None:
    result, found = violations_of(validation.email, value, "email")
    assert found == []
    assert result == (cleaned or value.lower())
    assert len(value) <= validation.MAX_EMAIL


@pytest.mark.parametrize(
    ("value", "reason", "description"),
    [
        ("", "REQUIRED", "is required"),
        ("ann", "INVALID", "is not a valid email address"),
        ("ann@", "INVALID", "is not a valid email address"),
        ("@example.com", "INVALID", "is not a valid email address"),
        ("ann@localhost", "INVALID", "is not a valid email address"),
        ("ann@example", "INVALID", "is not a valid email address"),
        ("ann@10.0.0.1", "INVALID", "is not a valid email address"),
        ("ann@-example.com", "INVALID", "is not a valid email address"),
        ("ann@example-.com", "INVALID", "is not a valid email address"),
        ("ann@example..com", "INVALID", "is not a valid email address"),
        ("ann@exa_mple.com", "INVALID", "is not a valid email address"),
        (".ann@example.com", "INVALID", "is not a valid email address"),
        ("ann.@example.com", "INVALID", "is not a valid email address"),
        ("a..nn@example.com", "INVALID", "is not a valid email address"),
        ("ann lee@example.com", "INVALID", "is not a valid email address"),
        ("a@b@example.com", "INVALID", "is not a valid email address"),
        ('"ann"@example.com', "INVALID", "is not a valid email address"),
        ("<script>@example.com", "INVALID", "is not a valid email address"),
        ("a" * 65 + "@example.com", "INVALID", "is not a valid email address"),
        ("ann@" + "b" * 64 + ".com", "INVALID", "is not a valid email address"),
        ("ann@exämple.com", "INVALID", "must be an ASCII address"),
        ("ann\u202e@example.com", "INVALID", "must be an ASCII address"),
        ("a@" + "b" * 250 + ".com", "INVALID", "at most 254 characters"),
    ],
)
def test_invalid_email_is_recorded_against_the_field(
    value: str, reason: str, description: str
) -> None:
    result, found = violations_of(validation.email, value, "user.email")
    assert result == ""
    assert [(v.field, v.reason) for v in found] == [("user.email", reason)]
    assert description in found[0].description


# --- password --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "correct horse battery staple",
        "abcdefghij",
        "abc" * 4,
        "ünïcödé pässwörd",
        "x" * 126 + "yz",
        "ann@example.co",  # not the address itself
    ],
)
def test_acceptable_passwords(value: str) -> None:
    _, found = violations_of(validation.password, value, "ann@example.com", "password")
    assert found == []


@pytest.mark.parametrize(
    ("value", "reason", "description"),
    [
        ("", "REQUIRED", "is required"),
        ("short", "INVALID", "must be 10-128 characters"),
        ("abcdefghi", "INVALID", "must be 10-128 characters"),
        ("x" * 128 + "y", "INVALID", "must be 10-128 characters"),
        ("abcdefghij\x00", "INVALID", "must not contain NUL"),
        ("ann@example.com", "INVALID", "must not be the email address"),
        ("ANN@Example.com", "INVALID", "must not be the email address"),
        ("aaaaaaaaaaaa", "INVALID", "is too repetitive"),
        ("abababababab", "INVALID", "is too repetitive"),
    ],
)
def test_unacceptable_passwords(value: str, reason: str, description: str) -> None:
    _, found = violations_of(validation.password, value, "ann@example.com", "new_password")
    assert [(v.field, v.reason) for v in found] == [("new_password", reason)]
    assert description in found[0].description


def test_password_equal_to_email_is_fine_when_no_email_is_known() -> None:
    _, found = violations_of(validation.password, "ann@example.com", "", "password")
    assert found == []


# --- display name ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "cleaned"),
    [
        ("Ann Lee", "Ann Lee"),
        ("  Ann Lee \t", "Ann Lee"),
        ("José Ñúñez", "José Ñúñez"),
        ("Jose\u0301", "Jos\u00e9"),  # combining accent composed (NFC)
        ("李小龍", "李小龍"),
        ("محمد", "محمد"),
        ("O'Brien & Sons (Ltd.)", "O'Brien & Sons (Ltd.)"),
        ("Ann 🙂", "Ann 🙂"),
        ("x" * 100, "x" * 100),
    ],
)
def test_valid_display_name_is_trimmed_and_nfc(value: str, cleaned: str) -> None:
    result, found = violations_of(validation.display_name, value, "user.display_name")
    assert found == []
    assert result == cleaned


@pytest.mark.parametrize(
    ("value", "reason", "description"),
    [
        ("", "REQUIRED", "is required"),
        ("   \t\n", "REQUIRED", "is required"),
        ("x" * 101, "INVALID", "at most 100 characters"),
        ("<script>alert(1)</script>", "INVALID", "markup"),
        ("<b>Ann</b>", "INVALID", "markup"),
        ("Ann <img src=x onerror=alert(1)>", "INVALID", "markup"),
        ("Ann >", "INVALID", "markup"),
        ("Ann\u202eeL", "INVALID", "formatting"),  # right-to-left override
        ("Ann\u202dLee", "INVALID", "formatting"),  # left-to-right override
        ("Ann\u2066Lee\u2069", "INVALID", "formatting"),  # isolates
        ("Ann\u200bLee", "INVALID", "formatting"),  # zero-width space
        ("Ann\ufeffLee", "INVALID", "formatting"),  # byte order mark
        ("Ann\x00Lee", "INVALID", "control"),
        ("Ann\x07Lee", "INVALID", "control"),
        ("Ann\nLee", "INVALID", "control"),
        ("Ann\x1b[31mLee", "INVALID", "control"),
        ("Ann\x85Lee", "INVALID", "control"),
        ("Ann\ue000", "INVALID", "control"),  # private use
        ("Ann\U000e0001", "INVALID", "formatting"),  # language tag
        ("Ann\u0378", "INVALID", "control"),  # unassigned
    ],
)
def test_invalid_display_name(value: str, reason: str, description: str) -> None:
    _, found = violations_of(validation.display_name, value, "user.display_name")
    assert [(v.field, v.reason) for v in found] == [("user.display_name", reason)]
    assert description in found[0].description


# --- language and time zone ------------------------------------------------------------


@pytest.mark.parametrize("value", ["en", "pt", "pt-BR", "zh-Hant-TW", "es-419", "yue", "EN-gb"])
def test_valid_language(value: str) -> None:
    result, found = violations_of(validation.language, value, "language")
    assert (result, found) == (value, [])


@pytest.mark.parametrize(
    "value",
    [
        "",
        "e",
        "english",
        "en_US",
        "en-",
        "-en",
        "en--US",
        "e1",
        "en-US-" + "x" * 9,
        "en us",
        "日本",
    ],
)
def test_invalid_language(value: str) -> None:
    _, found = violations_of(validation.language, value, "user.preferences.language")
    assert [v.field for v in found] == ["user.preferences.language"]
    assert "BCP 47" in found[0].description


@pytest.mark.parametrize("value", ["", "UTC", "Europe/Lisbon", "America/Sao_Paulo", "Asia/Kolkata"])
def test_valid_time_zone(value: str) -> None:
    result, found = violations_of(validation.time_zone, value, "time_zone")
    assert (result, found) == (value, [])


@pytest.mark.parametrize(
    "value", ["Mars/Olympus", "europe/lisbon", "Europe/Lisbon ", "+01:00", "../etc/passwd", "Z"]
)
def test_invalid_time_zone(value: str) -> None:
    _, found = violations_of(validation.time_zone, value, "user.preferences.time_zone")
    assert [v.field for v in found] == ["user.preferences.time_zone"]
    assert "IANA time zone" in found[0].description


def test_one_collector_names_every_bad_field() -> None:
    collected = Violations()
    validation.email("nope", "user.email", collected)
    validation.display_name("<x>", "user.display_name", collected)
    validation.language("english", "user.preferences.language", collected)
    validation.time_zone("Nowhere/Land", "user.preferences.time_zone", collected)
    assert [v.field for v in recorded(collected)] == [
        "user.email",
        "user.display_name",
        "user.preferences.language",
        "user.preferences.time_zone",
    ]


@pytest.mark.parametrize(
    "name",
    ["\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", "\U0001f469\u200d\U0001f4bb Dev"],
)
def test_display_names_keep_the_joiners_that_scripts_and_emoji_need(name: str) -> None:
    violations = Violations()
    assert validation.display_name(name, "display_name", violations) == name
    assert not violations
