"""The basic check of server/domain/proxies/basic.py, with the real Argon2id hasher (fast
parameters) and the real sign-in throttle over the in-process store: only the exact user
name and password are admitted, compared in normalization form C; wrong guesses are
throttled per tunnel; over-long guesses cost no hash and count for nothing."""

from __future__ import annotations

import asyncio
import unicodedata
from collections.abc import Iterator
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.domain.common.errors import ResourceExhausted
from server.domain.identity.passwords import PasswordHasher
from server.domain.identity.throttle import LoginThrottle, ThrottlePolicy
from server.domain.proxies.basic import BasicCheck
from server.domain.proxies.model import BasicCredentials
from server.domain.tunnels.model import Tunnel, TunnelConfig, WebAccess
from server.storage.kv import MemoryStore
from tests.helpers import FakeClock
from tests.unit.test_proxy_access import TUNNEL

NAME, PASSWORD = "Zoë", "crème brûlée 42"
NEVER = ThrottlePolicy(window=900, slowdown_after=10**9, lock_after=10**9,
                       ip_lock_after=10**9, lock_duration=900)  # fmt: skip
LOGIN_LIKE = ThrottlePolicy(window=900, slowdown_after=3, lock_after=10,
                            ip_lock_after=50, lock_duration=900)  # fmt: skip


@pytest.fixture(scope="module")
def hasher() -> Iterator[PasswordHasher]:
    made = PasswordHasher(1, 1024, 1, max_concurrent=2)
    yield made
    made.close()


def basic_tunnel(hasher: PasswordHasher, name: str = NAME, password: str = PASSWORD) -> Tunnel:
    hashed = asyncio.run(hasher.hash(password))
    config = TunnelConfig(web_access=WebAccess.BASIC, basic_username=name,
                          basic_password_hash=hashed)  # fmt: skip
    return replace(TUNNEL, config=config)


def check_of(hasher: PasswordHasher, policy: ThrottlePolicy) -> tuple[BasicCheck, FakeClock]:
    clock = FakeClock()
    return BasicCheck(hasher, LoginThrottle(MemoryStore(), policy, clock, prefix="basic")), clock


def near(text: str) -> st.SearchStrategy[str]:
    """``text`` itself, its other normal form, and near misses."""
    return st.one_of(
        st.just(text),
        st.just(unicodedata.normalize("NFD", text)),
        st.sampled_from([text.upper(), text.lower(), text + " ", " " + text, text[:-1], ""]),
        st.text(max_size=20),
    )


guesses = st.one_of(
    st.tuples(near(NAME), near(PASSWORD)),
    st.tuples(near(PASSWORD), near(NAME)),  # swapped
    st.tuples(st.text(max_size=70), st.text(max_size=130)),
)


@settings(max_examples=150, deadline=None)
@given(guess=guesses)
def test_only_the_exact_user_name_and_password_are_admitted(
    hasher: PasswordHasher, guess: tuple[str, str]
) -> None:
    check, _ = check_of(hasher, NEVER)
    tunnel = basic_tunnel(hasher)
    username, password = guess
    admitted = asyncio.run(check.admits(tunnel, BasicCredentials(username, password), "10.0.0.1"))
    nfc = (unicodedata.normalize("NFC", username), unicodedata.normalize("NFC", password))
    assert admitted is (nfc == (NAME, PASSWORD))


def test_wrong_guesses_at_a_tunnel_are_spaced_out_from_any_address(
    hasher: PasswordHasher,
) -> None:
    check, clock = check_of(hasher, LOGIN_LIKE)
    tunnel = basic_tunnel(hasher)
    right = BasicCredentials(NAME, PASSWORD)

    async def run() -> None:
        for address in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
            assert not await check.admits(tunnel, BasicCredentials(NAME, "a wrong guess"), address)
        # The third failure makes every address wait, the right credentials included.
        with pytest.raises(ResourceExhausted) as caught:
            await check.admits(tunnel, right, "10.0.0.9")
        assert caught.value.retry_after is not None
        assert 0 < caught.value.retry_after <= 1
        clock.advance(1.5)
        assert await check.admits(tunnel, right, "10.0.0.9")
        # Another tunnel's guesses were never held back.
        other = replace(tunnel, id="tun_01jd3k0000000000000000000z")
        assert await check.admits(other, right, "10.0.0.1")

    asyncio.run(run())


def test_an_over_long_guess_costs_no_hash_and_counts_for_nothing(hasher: PasswordHasher) -> None:
    check, _ = check_of(hasher, LOGIN_LIKE)
    tunnel = basic_tunnel(hasher)

    async def run() -> None:
        for guess in (BasicCredentials("a" * 65, PASSWORD), BasicCredentials(NAME, "p" * 129)):
            for _ in range(5):
                assert not await check.admits(tunnel, guess, "10.0.0.1")
        assert await check.admits(tunnel, BasicCredentials(NAME, PASSWORD), "10.0.0.1")

    asyncio.run(run())


def test_a_tunnel_without_a_hash_admits_nobody(hasher: PasswordHasher) -> None:
    check, _ = check_of(hasher, NEVER)
    tunnel = basic_tunnel(hasher)
    bare = replace(tunnel, config=replace(tunnel.config, basic_password_hash=""))
    assert not asyncio.run(check.admits(bare, BasicCredentials(NAME, PASSWORD), "10.0.0.1"))
    assert not asyncio.run(check.admits(bare, BasicCredentials(NAME, ""), "10.0.0.1"))


def test_the_password_stays_out_of_the_credentials_repr() -> None:
    text = repr(BasicCredentials(NAME, PASSWORD))
    assert NAME in text
    assert PASSWORD not in text
