"""Secrets at rest (server/storage/sealing.py): AES-256-GCM bound to the row."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.storage.sealing import PREFIX, Sealer, SealError, key_id, new_key, parse_keys

KEY = parse_keys(new_key())[0]
OTHER = parse_keys(new_key())[0]


@given(st.text(max_size=200), st.text(min_size=1, max_size=40))
def test_what_is_sealed_opens_to_itself_and_hides_it(plaintext: str, row: str) -> None:
    sealer = Sealer([KEY])
    sealed = sealer.seal(plaintext, row)
    assert sealed.startswith(f"{PREFIX}{key_id(KEY)}:")
    assert sealer.open(sealed, row) == plaintext
    if len(plaintext) >= 4:
        assert plaintext not in sealed


def test_each_seal_is_fresh() -> None:
    sealer = Sealer([KEY])
    assert sealer.seal("whsec_x", "whk_1") != sealer.seal("whsec_x", "whk_1")


def test_a_sealed_value_moved_to_another_row_does_not_open() -> None:
    sealer = Sealer([KEY])
    with pytest.raises(SealError):
        sealer.open(sealer.seal("whsec_x", "whk_1"), "whk_2")


def test_tampering_and_unknown_keys_are_refused() -> None:
    sealed = Sealer([KEY]).seal("whsec_x", "whk_1")
    head, _, body = sealed.rpartition(":")
    raw = bytearray(base64.b64decode(body))
    raw[-1] ^= 1
    with pytest.raises(SealError):
        Sealer([KEY]).open(f"{head}:{base64.b64encode(bytes(raw)).decode()}", "whk_1")
    with pytest.raises(SealError, match="no configured secrets key"):
        Sealer([OTHER]).open(sealed, "whk_1")
    with pytest.raises(SealError):
        Sealer([KEY]).open(f"{head}:not base64!", "whk_1")


def test_rotation_seals_with_the_first_key_and_opens_with_any() -> None:
    old = Sealer([KEY]).seal("whsec_old", "whk_1")
    rotated = Sealer([OTHER, KEY])
    assert rotated.open(old, "whk_1") == "whsec_old"
    assert rotated.seal("whsec_new", "whk_1").startswith(f"{PREFIX}{key_id(OTHER)}:")


def test_a_value_written_in_the_clear_is_read_as_it_is() -> None:
    assert Sealer([KEY]).open("whsec_legacy", "whk_1") == "whsec_legacy"


@pytest.mark.parametrize("text", ["", " , ", "not base64!", base64.b64encode(b"short").decode()])
def test_bad_keys_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="secrets key"):
        parse_keys(text)


def test_several_keys_parse_in_order() -> None:
    first, second = new_key(), new_key()
    assert parse_keys(f"{first}, {second}") == (
        base64.b64decode(first),
        base64.b64decode(second),
    )
