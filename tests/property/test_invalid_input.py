"""Property 5: Invalid input rejection.

Any invalid email, password or display name sent to Register, and any invalid profile sent
to UpdateUser, is refused with INVALID_ARGUMENT naming exactly the bad field: never another
code, and no user is created or changed. The invalid values are built constructively from
the documented rules, not by filtering through the server's own validators.
"""

from __future__ import annotations

import string
import zoneinfo
from collections.abc import Iterator

import grpc
import pytest
import pytest_asyncio
import sqlalchemy as sa
from google.protobuf import field_mask_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tunnelplane.v1 import auth_pb2, users_pb2

from server.app import App
from server.storage import tables
from tests.helpers import PASSWORD, Client, TestUser, fails, unique_email, violations

MAX_EXAMPLES = 25
SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
ZONES = frozenset(zoneinfo.available_timezones())
LETTERS = st.text(string.ascii_letters, min_size=1, max_size=20)
ALNUM = string.ascii_letters + string.digits


def around(bad: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """``bad`` with ordinary letters on both sides, so trimming cannot remove it."""
    return st.builds(lambda a, b, c: a + b + c, LETTERS, bad, LETTERS)


# --- invalid values -----------------------------------------------------------------------

_local_bad_chars = st.sampled_from(list(' (),:;<>[]\\"@\x00\n\t'))
_labels = st.text(ALNUM, min_size=1, max_size=20)
invalid_emails = st.one_of(
    st.just(""),
    st.text(ALNUM + ".-_", min_size=1, max_size=60),  # no @ at all
    st.builds("{}@example.com".format, around(_local_bad_chars)),
    st.builds(".{}@example.com".format, LETTERS),
    st.builds("{}.@example.com".format, LETTERS),
    st.builds("{}..{}@example.com".format, LETTERS, LETTERS),
    st.builds("@{}.com".format, _labels),  # empty local part
    st.builds("{}@{}".format, LETTERS, _labels),  # no dot in the domain
    st.builds("{}@-{}.com".format, LETTERS, _labels),
    st.builds("{}@{}-.com".format, LETTERS, _labels),
    st.builds("{}@{}..com".format, LETTERS, _labels),
    st.builds("{}@example.{}".format, LETTERS, st.integers(0, 10**6).map(str)),
    st.builds("{}@example.com".format, st.text(ALNUM, min_size=65, max_size=80)),
    st.builds(
        "{}@{}.com".format,
        LETTERS,
        st.lists(st.text(ALNUM, min_size=50, max_size=63), min_size=5, max_size=6).map(".".join),
    ),  # longer than 254
    st.builds(
        "{}@example.com".format,
        around(st.characters(codec="utf-8", min_codepoint=0x80)),
    ),
    st.builds("{}@example.com\n".format, LETTERS),
)

invalid_passwords = st.one_of(
    st.text(min_size=1, max_size=9),
    st.text(min_size=129, max_size=300),
    st.builds(
        lambda a, b: a + "\x00" + b,
        st.text(ALNUM, min_size=5, max_size=60),
        st.text(ALNUM, min_size=5, max_size=60),
    ),
    st.builds(
        lambda chars, n: (chars * 128)[:n],
        st.text(ALNUM, min_size=1, max_size=2),
        st.integers(10, 128),
    ),  # fewer than three distinct characters
)

_bidi = st.sampled_from(list("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"))
invalid_display_names = st.one_of(
    st.text(" \t\n\r\u00a0\u2003\u3000", min_size=1, max_size=10),  # blank once trimmed
    st.text(string.ascii_letters, min_size=101, max_size=200),
    around(st.sampled_from(["<", ">", "<script>", "</b>"])),
    around(_bidi),
    around(
        st.characters(
            codec="utf-8", categories=("Cc", "Cf", "Co"), exclude_characters="\u200c\u200d"
        )
    ),
)

invalid_languages = st.one_of(
    st.just(""),
    st.sampled_from(string.ascii_letters),  # one letter
    st.text(string.ascii_letters, min_size=9, max_size=20),  # primary subtag too long
    st.builds("{}{}".format, st.sampled_from(string.digits), LETTERS),  # starts with a digit
    st.builds("{}--{}".format, LETTERS.map(lambda s: s[:3]), LETTERS),
    st.builds("{}-".format, LETTERS.map(lambda s: s[:3])),
    st.builds("en-{}".format, st.text(ALNUM, min_size=9, max_size=20)),  # subtag too long
    st.builds("en{}".format, around(st.characters(codec="utf-8", exclude_characters=ALNUM + "-"))),
    st.builds("{}\n".format, st.sampled_from(["en", "pt-BR"])),
    st.just("en-" + "-".join(["abcdefgh"] * 4)),  # longer than 35
)

invalid_zones = st.one_of(
    st.text(min_size=1, max_size=40),
    st.sampled_from(sorted(ZONES)).map(str.lower),
    st.sampled_from(sorted(ZONES)).map(lambda z: z + "/.."),
    st.sampled_from(sorted(ZONES)).map(lambda z: "../" + z),
    st.sampled_from(sorted(ZONES)).map(lambda z: z + "\x00"),
).filter(lambda z: z not in ZONES)

undefined_themes = st.one_of(st.integers(4, 2**31 - 1), st.integers(-(2**31), -1))

#: (mask path, violated field, strategy of a User message that breaks it).
invalid_profiles = st.one_of(
    st.one_of(st.just(""), invalid_display_names).map(
        lambda n: ("display_name", "user.display_name", users_pb2.User(display_name=n))
    ),
    invalid_languages.map(
        lambda v: (
            "preferences.language",
            "user.preferences.language",
            users_pb2.User(preferences=users_pb2.Preferences(language=v)),
        )
    ),
    invalid_zones.map(
        lambda v: (
            "preferences.time_zone",
            "user.preferences.time_zone",
            users_pb2.User(preferences=users_pb2.Preferences(time_zone=v)),
        )
    ),
    undefined_themes.map(
        lambda v: (
            "preferences.theme",
            "user.preferences.theme",
            users_pb2.User(preferences=users_pb2.Preferences(theme=v)),
        )
    ),
)


# --- fixtures -----------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def subject(app: App, channel: grpc.aio.Channel) -> tuple[Client, TestUser]:
    """One signed-in user per backend, reused by every example."""
    client = Client(app, channel)
    return client, await client.new_user(tag="invalid")


@pytest.fixture
def examples() -> Iterator[list[object]]:
    """Collects the examples a property test ran; checks that it really ran them."""
    seen: list[object] = []
    yield seen
    assert len(seen) >= MAX_EXAMPLES, f"only {len(seen)} examples ran"


async def user_count(app: App) -> int:
    """Rows in the users table."""
    async with app.db.engine.connect() as conn:
        return int(await conn.scalar(sa.select(sa.func.count()).select_from(tables.users)) or 0)


async def refused_registration(client: Client, request: auth_pb2.RegisterRequest) -> set[str]:
    """Register ``request``; it must be INVALID_ARGUMENT and create nobody. The bad fields."""
    before = await user_count(client.app)
    error = await fails(client.auth.Register(request), grpc.StatusCode.INVALID_ARGUMENT)
    assert await user_count(client.app) == before
    return set(violations(error))


# --- Register -------------------------------------------------------------------------------


@SETTINGS
@given(email=invalid_emails)
async def test_register_refuses_invalid_emails(
    subject: tuple[Client, TestUser], examples: list[object], email: str
) -> None:
    examples.append(email)
    client, _ = subject
    request = auth_pb2.RegisterRequest(email=email, password=PASSWORD, display_name="Valid Name")
    assert await refused_registration(client, request) == {"email"}


@SETTINGS
@given(password=invalid_passwords)
async def test_register_refuses_invalid_passwords(
    subject: tuple[Client, TestUser], examples: list[object], password: str
) -> None:
    examples.append(password)
    client, _ = subject
    request = auth_pb2.RegisterRequest(
        email=unique_email("badpw"), password=password, display_name="Valid Name"
    )
    assert await refused_registration(client, request) == {"password"}


@SETTINGS
@given(local=st.text(string.ascii_lowercase, min_size=1, max_size=30), data=st.data())
async def test_register_refuses_the_email_as_password(
    subject: tuple[Client, TestUser], examples: list[object], local: str, data: st.DataObject
) -> None:
    email = f"{local}@example.com"
    password = data.draw(st.sampled_from([email, email.upper(), email.swapcase()]))
    examples.append(password)
    client, _ = subject
    request = auth_pb2.RegisterRequest(email=email, password=password, display_name="Valid")
    assert await refused_registration(client, request) == {"password"}


@SETTINGS
@given(name=invalid_display_names)
async def test_register_refuses_invalid_display_names(
    subject: tuple[Client, TestUser], examples: list[object], name: str
) -> None:
    examples.append(name)
    client, _ = subject
    request = auth_pb2.RegisterRequest(
        email=unique_email("badname"), password=PASSWORD, display_name=name
    )
    assert await refused_registration(client, request) == {"display_name"}


# --- UpdateUser -----------------------------------------------------------------------------


@SETTINGS
@given(case=invalid_profiles)
async def test_update_refuses_invalid_profiles(
    subject: tuple[Client, TestUser],
    examples: list[object],
    case: tuple[str, str, users_pb2.User],
) -> None:
    examples.append(case)
    client, user = subject
    path, field, message = case
    message.name = "users/me"
    me = users_pb2.GetUserRequest(name="users/me")
    before = await client.users.GetUser(me, metadata=user.metadata)
    count = await user_count(client.app)
    error = await fails(
        client.users.UpdateUser(
            users_pb2.UpdateUserRequest(
                user=message, update_mask=field_mask_pb2.FieldMask(paths=[path])
            ),
            metadata=user.metadata,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(violations(error)) == {field}
    assert await client.users.GetUser(me, metadata=user.metadata) == before
    assert await user_count(client.app) == count
