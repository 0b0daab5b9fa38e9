"""What an ``Authorization`` header offers the proxy (proxy/credentials.py): Basic
credentials read back exactly as a browser encodes them, whatever they hold; anything
that is not base64 of UTF-8 ``user:password`` offers nothing; each offer has a digest of
its own for the decision cache."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.credentials import NOTHING, Offered, offered

texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
usernames = texts.filter(lambda t: ":" not in t)


def basic(raw: bytes, scheme: str = "Basic") -> str:
    return f"{scheme} {base64.b64encode(raw).decode()}"


@given(username=usernames, password=texts, scheme=st.sampled_from(["Basic", "basic", "BASIC"]))
def test_basic_credentials_read_back_as_they_were_encoded(
    username: str, password: str, scheme: str
) -> None:
    header = basic(f"{username}:{password}".encode(), scheme)
    assert offered(header) == Offered(username=username, password=password)
    assert offered(f"  {header}  ") == Offered(username=username, password=password)


@pytest.mark.parametrize(
    "header",
    [
        "",
        "Basic",
        "Basic ",
        "Basic !!!",
        "Basic YW5u",  # "ann": no colon
        basic(b"\xff\xfe:x"),  # not UTF-8
        basic(b"ann:x")[:-2],  # cut short
        "Digest username=ann",
        "Negotiate abc",
    ],
)
def test_what_is_no_basic_or_bearer_credential_offers_nothing(header: str) -> None:
    assert offered(header) == NOTHING
    assert NOTHING.digest() == b""


def test_bearer_credentials_are_offered_as_they_are() -> None:
    assert offered("Bearer tp_abc") == Offered(bearer="tp_abc")
    assert offered("bearer  tp_abc ") == Offered(bearer="tp_abc")


@given(first=st.tuples(usernames, texts), second=st.tuples(usernames, texts))
def test_each_offer_has_a_digest_of_its_own(
    first: tuple[str, str], second: tuple[str, str]
) -> None:
    one = Offered(username=first[0], password=first[1])
    other = Offered(username=second[0], password=second[1])
    if one != other:
        assert one.digest() != other.digest()
    if one.username or one.password:
        as_bearer = Offered(bearer=f"{one.username}:{one.password}")
        assert one.digest() != as_bearer.digest()


def test_secrets_stay_out_of_the_repr() -> None:
    text = repr(Offered(bearer="tp_secret")) + repr(Offered(username="ann", password="s3cret"))
    assert "tp_secret" not in text
    assert "s3cret" not in text
