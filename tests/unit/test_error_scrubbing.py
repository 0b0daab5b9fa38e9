"""What leaves for Sentry: no secret or person survives :func:`server.errortracking.scrub`,
wherever in an event it was put."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from server.errortracking import scrub
from server.redaction import FILTERED

_token = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
    min_size=8,
    max_size=40,
)
secrets = st.one_of(
    st.builds(
        lambda local, host: f"{local}@{host}.com",
        st.from_regex(r"[a-z][a-z0-9.]{2,12}", fullmatch=True),
        st.from_regex(r"[a-z]{3,10}", fullmatch=True),
    ),
    st.builds(lambda a, b, c: f"eyJ{a}.{b}.{c}", _token, _token, _token),
    st.builds(lambda body: f"tp_live_{body}", _token),
)
#: Where a message can carry a secret: around other text, in a bearer header.
frames = st.sampled_from(["{}", "failed for {} today", "Bearer {}", "x={}; y=2", "({})"])


def event_with(message: str) -> dict[str, Any]:
    return {
        "message": message,
        "exception": {"values": [{"type": "RuntimeError", "value": message}]},
        "tags": {"method": "tunnelplane.v1.UserService/GetUser", "request_id": "r-1"},
        "contexts": {"trace": {"trace_id": "0" * 32}},
    }


@given(secrets, frames)
def test_no_secret_or_address_survives(secret: str, frame: str) -> None:
    cleaned = scrub(event_with(frame.format(secret)))
    assert secret not in json.dumps(cleaned)


def test_secret_keys_are_filtered_anywhere_and_request_user_breadcrumbs_dropped() -> None:
    event = event_with("boom") | {
        "request": {"headers": {"Authorization": "Bearer x"}},
        "user": {"email": "a@b.co"},
        "breadcrumbs": {"values": [{"message": "GET /"}]},
        "extra": {"anything": "at all"},
        "contexts": {"app": {"password": "hunter2", "api_key": "k", "Cookie": "c", "name": "ok"}},
    }
    cleaned = scrub(event)
    for dropped in ("request", "user", "breadcrumbs", "extra"):
        assert dropped not in cleaned
    assert cleaned["contexts"]["app"] == {
        "password": FILTERED,
        "api_key": FILTERED,
        "Cookie": FILTERED,
        "name": "ok",
    }
    assert cleaned["tags"] == event["tags"]


def test_sql_parameters_in_a_message_are_filtered() -> None:
    message = (
        "(sqlite3.IntegrityError) UNIQUE failed [SQL: INSERT ...] [parameters: ('x', 'secret')]"
    )
    cleaned = scrub(event_with(message))
    assert "secret" not in json.dumps(cleaned)
    assert "[parameters: [Filtered]]" in cleaned["message"]
