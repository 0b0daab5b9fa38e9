"""Laws of the API key checksum: every well-formed key passes, and any one-character
substitution or adjacent swap in it is caught without a database read."""

from __future__ import annotations

import string
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

from server.domain.identity.rules import generate_secret, looks_like_key

BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
bodies = st.text(alphabet=BASE62, min_size=32, max_size=32)


def reference_checksum(body: str) -> str:
    value, digits = zlib.crc32(f"tp_{body}".encode()), ""
    for _ in range(6):
        value, digit = divmod(value, 62)
        digits = BASE62[digit] + digits
    return digits


def key_of(body: str) -> str:
    return f"tp_{body}{reference_checksum(body)}"


@settings(max_examples=300)
@given(bodies)
def test_every_well_formed_key_is_recognised(body: str) -> None:
    assert looks_like_key(key_of(body))


def test_generated_secrets_are_always_recognised() -> None:
    # generate_secret draws from the OS random source, which hypothesis cannot steer.
    assert all(looks_like_key(generate_secret()) for _ in range(2000))


@settings(max_examples=500)
@given(body=bodies, data=st.data())
def test_any_single_substitution_is_caught(body: str, data: st.DataObject) -> None:
    key = key_of(body)
    index = data.draw(st.integers(0, len(key) - 1), label="index")
    char = data.draw(st.characters(codec="utf-8").filter(lambda c: c != key[index]), label="char")
    assert not looks_like_key(key[:index] + char + key[index + 1 :])


@settings(max_examples=300)
@given(body=bodies, data=st.data())
def test_any_adjacent_swap_in_the_body_is_caught(body: str, data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(body) - 2), label="index")
    swapped = body[:index] + body[index + 1] + body[index] + body[index + 2 :]
    key = key_of(body)
    tampered = f"tp_{swapped}{key[-6:]}"
    assert looks_like_key(tampered) == (swapped == body)


@settings(max_examples=200)
@given(body=bodies, data=st.data())
def test_inserting_or_deleting_a_character_is_caught(body: str, data: st.DataObject) -> None:
    key = key_of(body)
    index = data.draw(st.integers(0, len(key) - 1), label="index")
    char = data.draw(st.sampled_from(BASE62), label="char")
    assert not looks_like_key(key[:index] + key[index + 1 :])
    assert not looks_like_key(key[:index] + char + key[index:])
