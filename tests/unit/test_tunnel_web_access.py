"""What a tunnel's web access must hold (server/domain/tunnels/web_access.py): the basic
user name and password, each mode's fields empty with the others, and the stored hash,
which no request carries, kept or dropped."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.domain.common.errors import FieldViolation, InvalidArgument, Violations
from server.domain.tunnels.model import TunnelConfig, WebAccess
from server.domain.tunnels.web_access import (
    check_basic,
    check_web_access,
    sealed,
    with_stored_hash,
)

PREFIX = "tunnel.config."
USERNAME, PASSWORD = PREFIX + "basic_username", PREFIX + "basic_password"
HASH = "$argon2id$v=19$m=1024,t=1,p=1$c2FsdA$aGFzaA"
BASIC = WebAccess.BASIC


def checked(config: TunnelConfig) -> tuple[TunnelConfig, list[FieldViolation]]:
    """The cleaned config and the violations recorded on the way."""
    collected = Violations()
    result = check_web_access(config, PREFIX, collected)
    if not collected:
        return result, []
    with pytest.raises(InvalidArgument) as caught:
        collected.raise_if_any()
    return result, caught.value.violations


def basic(username: str = "ann", password: str = "", stored: str = "") -> TunnelConfig:
    return TunnelConfig(
        web_access=BASIC,
        basic_username=username,
        basic_password=password,
        basic_password_hash=stored,
    )


@pytest.mark.parametrize(
    "username",
    ["ann", "Ann Lee", "a" * 64, "ünïcödé", "ann@example.com", "日本語", "a-b_c.d+e"],
)
def test_acceptable_user_names(username: str) -> None:
    result, found = checked(basic(username, "correct horse"))
    assert found == []
    assert result.basic_username == username


@pytest.mark.parametrize(
    ("username", "reason", "description"),
    [
        ("", "REQUIRED", "is required"),
        ("a" * 65, "INVALID", "at most 64"),
        ("ann:lee", "INVALID", "':'"),
        (":", "INVALID", "':'"),
        (" ann", "INVALID", "no space at either end"),
        ("ann ", "INVALID", "no space at either end"),
        ("ann\tlee", "INVALID", "printable"),
        ("ann\x00", "INVALID", "printable"),
        ("ann\r\nX-Injected", "INVALID", "printable"),
        ("ann\u202e", "INVALID", "printable"),  # a bidirectional override
        ("ann\u00a0lee", "INVALID", "printable"),  # a space that is not ASCII's
    ],
)
def test_unacceptable_user_names(username: str, reason: str, description: str) -> None:
    _, found = checked(basic(username, "correct horse"))
    assert [(v.field, v.reason) for v in found] == [(USERNAME, reason)]
    assert description in found[0].description


@pytest.mark.parametrize(
    ("password", "description"),
    [
        ("short", "must be 10-128 characters"),
        ("x" * 127 + "yz", "must be 10-128 characters"),
        ("correct\x00horse", "printable"),
        ("correct\nhorse", "printable"),
        ("ann-ann-ann", None),  # fine: not the user name itself
        ("ann", "must be 10-128"),
        ("aaaaaaaaaaaa", "too repetitive"),
    ],
)
def test_new_passwords_are_checked(password: str, description: str | None) -> None:
    _, found = checked(basic("ann", password))
    if description is None:
        assert found == []
    else:
        assert [v.field for v in found] == [PASSWORD]
        assert description in found[0].description


def test_the_password_must_not_be_the_user_name() -> None:
    _, found = checked(basic("a long user name", "a long user name"))
    assert [(v.field, v.description) for v in found] == [(PASSWORD, "must not be the user name")]


def test_basic_needs_a_password_unless_one_is_stored() -> None:
    _, found = checked(basic("ann"))
    assert [(v.field, v.reason) for v in found] == [(PASSWORD, "REQUIRED")]
    kept, found = checked(basic("ann", stored=HASH))
    assert found == []
    assert kept.basic_password_hash == HASH
    # A new password replaces the stored one (the use case hashes it).
    new, found = checked(basic("ann", "correct horse", stored=HASH))
    assert (found, new.basic_password) == ([], "correct horse")


@pytest.mark.parametrize("access", [WebAccess.PRIVATE, WebAccess.PUBLIC])
def test_other_modes_take_no_basic_credentials_and_drop_the_hash(access: WebAccess) -> None:
    left, found = checked(TunnelConfig(web_access=access, basic_password_hash=HASH))
    assert found == []
    assert (left.basic_username, left.basic_password, left.basic_password_hash) == ("", "", "")
    given_both = TunnelConfig(web_access=access, basic_username="ann", basic_password="x" * 12)
    _, found = checked(given_both)
    assert sorted(v.field for v in found) == [PASSWORD, USERNAME]
    assert all("unless web_access is BASIC" in v.description for v in found)


def test_basic_takes_no_networks_and_an_allowlist_no_credentials() -> None:
    _, found = checked(TunnelConfig(web_access=BASIC, basic_username="ann",
                                    basic_password="correct horse",
                                    allowed_networks=("10.0.0.0/8",)))  # fmt: skip
    assert [v.field for v in found] == [PREFIX + "allowed_networks"]
    listed = TunnelConfig(web_access=WebAccess.IP_ALLOWLIST, allowed_networks=("10.0.0.0/8",),
                          basic_username="ann")  # fmt: skip
    _, found = checked(listed)
    assert [v.field for v in found] == [USERNAME]


def test_user_name_and_password_are_kept_in_normalization_form_c() -> None:
    decomposed = unicodedata.normalize("NFD", "Zoë")
    result, found = checked(basic(decomposed, unicodedata.normalize("NFD", "crème brûlée")))
    assert found == []
    assert (result.basic_username, result.basic_password) == ("Zoë", "crème brûlée")


@given(stored=st.text(max_size=20), requested=st.text(max_size=20))
def test_the_hash_always_comes_from_storage(stored: str, requested: str) -> None:
    """Whatever a request's config holds, the merged config has the stored hash; sealing
    puts the new hash in place of the password as given."""
    merged = with_stored_hash(basic(stored=requested), basic(stored=stored))
    assert merged.basic_password_hash == stored
    done = sealed(basic(password="correct horse"), stored)
    assert (done.basic_password, done.basic_password_hash) == ("", stored)


def test_secrets_stay_out_of_the_config_repr() -> None:
    text = repr(basic("ann", "correct horse", HASH))
    assert "correct horse" not in text
    assert HASH not in text
    assert "ann" in text


def test_check_basic_alone_names_fields_under_the_prefix_it_is_given() -> None:
    collected = Violations()
    check_basic(basic(""), "config.", collected)
    with pytest.raises(InvalidArgument) as caught:
        collected.raise_if_any()
    assert {v.field for v in caught.value.violations} == {
        "config.basic_username",
        "config.basic_password",
    }
