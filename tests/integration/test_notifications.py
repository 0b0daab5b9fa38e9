"""Critical notifications against real parts: a server whose Redis is unreachable tells a
webhook receiver (signed, Standard Webhooks) and a real SMTP sink (aiosmtpd) once, however
many rounds see it; a user whose webhook endpoint is disabled by a 410 gets an email, as
their preferences allow."""

from __future__ import annotations

import email
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from standardwebhooks.webhooks import Webhook as StandardWebhook
from tunnelplane.v1 import users_pb2

from server.domain.webhooks.rules import new_secret
from tests.conftest import sqlite_server
from tests.helpers import client_of, eventually, free_port
from tests.webhook_receiver import Receiver


class Sink:
    """An SMTP server that keeps what it is sent."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802, ARG002 - aiosmtpd calls it so
        message = email.message_from_bytes(envelope.content)
        message["X-Rcpt"] = ",".join(envelope.rcpt_tos)
        self.messages.append(message)
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[Sink, int]]:
    sink, port = Sink(), free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield sink, port
    finally:
        controller.stop()


def counted(app: Any, channel: str, result: str) -> float:
    value = app.registry.get_sample_value(
        "tunnelplane_notifications_total", {"channel": channel, "result": result}
    )
    return value or 0.0


async def test_a_dependency_down_is_told_once_to_every_channel(
    tmp_path: Path, smtp: tuple[Sink, int]
) -> None:
    sink, port = smtp
    secret = new_secret()
    async with (
        Receiver() as rx,
        sqlite_server(
            tmp_path,
            redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nobody listens there
            health_interval=0.1,
            notify_down_after=0.05,
            notify_webhook_urls=rx.url("/notices"),
            notify_webhook_secret=secret,
            notify_email_to="ops@example.com, oncall@example.com",
            smtp_host="127.0.0.1",
            smtp_port=port,
        ) as app,
    ):
        watch = app.notifications.watch

        async def told() -> bool:
            await watch.round()
            return len(rx.at("/notices")) == 1 and len(sink.messages) == 1

        await eventually(told, within=10)
        for _ in range(3):  # more rounds see it still down: nothing more is sent
            await watch.round()
        assert len(rx.at("/notices")) == 1
        assert len(sink.messages) == 1

        seen = rx.at("/notices")[0]
        verified = StandardWebhook(secret).verify(seen.body, seen.headers)
        assert verified["type"] == "notice.critical"
        assert verified["data"]["key"] == "dependency_down:redis"
        assert verified["data"]["details"]["dependency"] == "redis"
        mail = sink.messages[0]
        assert mail["Subject"].startswith("[Tunnelplane critical] redis has been down")
        assert mail["X-Rcpt"] == "ops@example.com,oncall@example.com"
        assert mail["X-Tunnelplane-Notice"] == "dependency_down:redis"
        assert counted(app, "webhook", "sent") == 1
        assert counted(app, "email", "sent") == 1
        assert "dependency_down:redis" in watch.conditions.active


async def test_a_disabled_endpoint_is_mailed_to_its_owner_as_preferences_allow(
    tmp_path: Path, smtp: tuple[Sink, int]
) -> None:
    sink, port = smtp
    async with (
        Receiver() as rx,
        sqlite_server(tmp_path, smtp_host="127.0.0.1", smtp_port=port) as app,
        client_of(app) as client,
    ):
        wants, declines = await client.new_user(tag="wants"), await client.new_user(tag="no")
        await client.users.UpdateUser(
            users_pb2.UpdateUserRequest(
                user=users_pb2.User(
                    name=declines.name,
                    preferences=users_pb2.Preferences(
                        notifications=users_pb2.NotificationPreferences(service_alerts=False)
                    ),
                ),
                update_mask={"paths": ["preferences.notifications.service_alerts"]},
            ),
            metadata=declines.metadata,
        )
        for user in (wants, declines):
            rx.script(f"/gone-{user.id}", 410)
            await client.webhook(user, rx.url(f"/gone-{user.id}"))
            await client.tunnel(user)  # an event: its delivery meets the 410

        async def mailed() -> bool:
            await app.webhooks.dispatcher.run_once()
            await app.notifications.watch.round()
            return (
                counted(app, "user_email", "sent") + counted(app, "user_email", "not_wanted") >= 2
            )

        await eventually(mailed, within=15)
        assert [m["To"] for m in sink.messages] == [wants.email]
        assert "webhook endpoint was disabled" in sink.messages[0]["Subject"]
        assert counted(app, "user_email", "not_wanted") == 1
