"""Property 4: User profile serialization round trip.

Any valid profile survives the conversion to the API form and back (pure), the stored JSON
form and back (pure), and an UpdateUser with mask ``*`` followed by GetUser through the
real server and storage, on every backend.
"""

from __future__ import annotations

import string
import unicodedata
import zoneinfo
from collections.abc import Iterator
from datetime import UTC, datetime

import grpc
import pytest
import pytest_asyncio
from google.protobuf import field_mask_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tunnelplane.v1 import users_pb2

from server.api import convert
from server.app import App
from server.domain.common.ids import new_id
from server.domain.common.validation import MAX_DISPLAY_NAME
from server.domain.identity.model import (
    Notifications,
    Preferences,
    Profile,
    Role,
    Theme,
    Tier,
    User,
    UserState,
)
from server.storage.identity.users import preferences_from_json, preferences_to_json
from tests.helpers import Client, TestUser

MAX_EXAMPLES = 25
LANGUAGES = ("en", "pt-BR", "fr", "de-CH", "zh-Hant-TW", "es-419", "sr-Latn-RS", "fil")
ZONES = ("", *sorted(zoneinfo.available_timezones()))
PROTO_THEMES = {
    Theme.SYSTEM: users_pb2.Preferences.THEME_SYSTEM,
    Theme.LIGHT: users_pb2.Preferences.THEME_LIGHT,
    Theme.DARK: users_pb2.Preferences.THEME_DARK,
}
#: Letters and digits of any script, plus ASCII punctuation the rules allow.
NAME_CHARS = st.one_of(
    st.sampled_from(string.ascii_letters + string.digits + " .,'-_()!?&@#%*+=/\\\"$"),
    st.characters(categories=("L", "N")),
)


def is_clean_name(name: str) -> bool:
    """What the server keeps as given: NFC, trimmed, non-empty."""
    return bool(name) and name == unicodedata.normalize("NFC", name).strip()


display_names = st.text(NAME_CHARS, min_size=1, max_size=MAX_DISPLAY_NAME).filter(is_clean_name)
notifications = st.builds(
    Notifications,
    email=st.booleans(),
    security_alerts=st.booleans(),
    product_updates=st.booleans(),
    service_alerts=st.booleans(),
)
preferences = st.builds(
    Preferences,
    theme=st.sampled_from(Theme),
    language=st.sampled_from(LANGUAGES),
    time_zone=st.sampled_from(ZONES),
    notifications=notifications,
)
profiles = st.builds(Profile, display_name=display_names, preferences=preferences)


def domain_user(profile: Profile) -> User:
    """A user record carrying ``profile``."""
    now = datetime.now(UTC)
    return User(
        id=new_id("usr"),
        email="someone@example.com",
        display_name=profile.display_name,
        role=Role.USER,
        tier=Tier.FREE,
        state=UserState.ACTIVE,
        preferences=profile.preferences,
        create_time=now,
        update_time=now,
    )


def message_of(profile: Profile) -> users_pb2.User:
    """``profile`` in its API form, as a client would send it."""
    p, n = profile.preferences, profile.preferences.notifications
    return users_pb2.User(
        display_name=profile.display_name,
        preferences=users_pb2.Preferences(
            theme=PROTO_THEMES[p.theme],
            language=p.language,
            time_zone=p.time_zone,
            notifications=users_pb2.NotificationPreferences(
                email=n.email,
                security_alerts=n.security_alerts,
                product_updates=n.product_updates,
                service_alerts=n.service_alerts,
            ),
        ),
    )


# --- pure -------------------------------------------------------------------------------


@settings(max_examples=200)
@given(profiles)
def test_api_form_round_trip(profile: Profile) -> None:
    assert convert.profile(convert.user(domain_user(profile))) == profile


@settings(max_examples=200)
@given(preferences)
def test_stored_form_round_trip(prefs: Preferences) -> None:
    assert preferences_from_json(preferences_to_json(prefs)) == prefs


# --- through the server -----------------------------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def roundtrip_user(app: App, channel: grpc.aio.Channel) -> tuple[Client, TestUser]:
    """One user per backend, reused by every example."""
    client = Client(app, channel)
    return client, await client.new_user(tag="roundtrip")


@pytest.fixture
def examples() -> Iterator[list[Profile]]:
    """Collects the profiles a property test ran with; checks that it really ran them."""
    seen: list[Profile] = []
    yield seen
    assert len(seen) >= MAX_EXAMPLES, f"only {len(seen)} examples ran"


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(profile=profiles)
async def test_update_then_get_returns_the_same_profile(
    roundtrip_user: tuple[Client, TestUser], examples: list[Profile], profile: Profile
) -> None:
    examples.append(profile)
    client, user = roundtrip_user
    sent = message_of(profile)
    sent.name = "users/me"
    updated = await client.users.UpdateUser(
        users_pb2.UpdateUserRequest(user=sent, update_mask=field_mask_pb2.FieldMask(paths=["*"])),
        metadata=user.metadata,
    )
    fetched = await client.users.GetUser(
        users_pb2.GetUserRequest(name="users/me"), metadata=user.metadata
    )
    expected = message_of(profile)
    for got in (updated, fetched):
        assert got.display_name == expected.display_name
        assert got.preferences == expected.preferences
        assert convert.profile(got) == profile
    assert fetched.etag == updated.etag
