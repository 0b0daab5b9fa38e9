"""Notification channels: a webhook URL (Standard Webhooks, signed) and email through an
SMTP relay (aiosmtplib). Each send is tried three times with an exponential, fully
jittered wait (tenacity): a notice is keyed, so a receiver sees a repeat as one."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

import aiohttp
import aiosmtplib
from tenacity import AsyncRetrying, stop_after_attempt, wait_random_exponential

from server.domain.notifications.model import Notice
from server.domain.webhooks.rules import sign

ATTEMPTS = 3
TIMEOUT = 10.0


def payload(notice: Notice) -> dict[str, Any]:
    """The JSON body of a notice."""
    return {
        "type": f"notice.{notice.severity.value}",
        "timestamp": notice.time.isoformat(),
        "data": {
            "key": notice.key,
            "severity": notice.severity.value,
            "summary": notice.summary,
            "details": notice.details,
        },
    }


async def _retried(send: Callable[[], Awaitable[None]]) -> None:
    async for attempt in AsyncRetrying(
        stop=stop_after_attempt(ATTEMPTS),
        wait=wait_random_exponential(multiplier=0.2, max=2.0),
        reraise=True,
    ):
        with attempt:
            await send()


class WebhookChannel:
    """POSTs each notice to one URL, signed as Standard Webhooks do (``webhook-id`` is the
    notice's key and time, so a retried notice carries the same id)."""

    kind = "webhook"

    def __init__(self, url: str, secret: str, session: Callable[[], aiohttp.ClientSession]):
        self.url = url
        self.name = url.split("?", 1)[0]  # no query string in logs (it may hold a token)
        self._secret = secret
        self._session = session

    async def send(self, notice: Notice) -> None:
        body = json.dumps(payload(notice), separators=(",", ":")).encode()
        msg_id = f"ntc_{notice.key}_{int(notice.time.timestamp())}"
        now = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(now),
            "webhook-signature": sign([self._secret], msg_id, now, body),
        }

        async def post() -> None:
            limit = aiohttp.ClientTimeout(total=TIMEOUT)
            async with self._session().post(
                self.url, data=body, headers=headers, timeout=limit
            ) as answer:
                if answer.status >= 300:
                    raise RuntimeError(f"the receiver answered {answer.status}")

        await _retried(post)


@dataclass(frozen=True, slots=True)
class Smtp:
    """An SMTP relay."""

    host: str
    port: int
    starttls: bool
    username: str
    password: str
    sender: str

    async def mail(self, to: str, notice: Notice) -> None:
        """Send ``notice`` to ``to`` (users' own notices)."""
        await self.mail_many([to], notice)

    async def mail_many(self, to: list[str], notice: Notice) -> None:
        message = EmailMessage()
        message["From"] = self.sender
        message["To"] = ", ".join(to)
        message["Subject"] = notice.subject
        message["X-Tunnelplane-Notice"] = notice.key
        lines = [notice.summary, "", f"Severity: {notice.severity.value}",
                 f"Time: {notice.time.isoformat()}"]  # fmt: skip
        lines += [f"{k}: {v}" for k, v in sorted(notice.details.items())]
        message.set_content("\n".join(lines) + "\n")

        async def send() -> None:
            await aiosmtplib.send(
                message,
                hostname=self.host,
                port=self.port,
                start_tls=self.starttls,
                username=self.username or None,
                password=self.password or None,
                timeout=TIMEOUT,
            )

        await _retried(send)


class EmailChannel:
    """Mails each notice to a list of addresses."""

    kind = "email"

    def __init__(self, smtp: Smtp, to: list[str]) -> None:
        self._smtp = smtp
        self._to = to
        self.name = "email:" + ",".join(to)

    async def send(self, notice: Notice) -> None:
        await self._smtp.mail_many(self._to, notice)
