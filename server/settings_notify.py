"""The settings of critical notifications and the SMTP relay: a base of
:class:`server.settings.Settings`, which has every field of this one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _doc(text: str) -> dict[str, Any]:
    return {"doc": text, "env": ""}


@dataclass(frozen=True, slots=True)
class NotificationSettings:
    """Where critical notices go, and how often."""

    notify_webhook_urls: str = field(
        default="",
        metadata=_doc(
            "Critical notifications: comma-separated URLs each notice is POSTed to "
            "(Standard Webhooks, signed with TP_NOTIFY_WEBHOOK_SECRET)"
        ),
    )
    notify_webhook_secret: str = field(
        default="", metadata=_doc("`whsec_...` secret that signs notices to those URLs")
    )
    notify_email_to: str = field(
        default="",
        metadata=_doc("Critical notifications: comma-separated addresses mailed each notice"),
    )
    notify_per_hour: int = field(
        default=20,
        metadata=_doc(
            "Notices each channel (and each user) gets in an hour at most; the rest are "
            "dropped and counted"
        ),
    )
    notify_down_after: float = field(
        default=60.0,
        metadata=_doc("Seconds a dependency must stay down before a notice goes out"),
    )
    notify_error_rate: float = field(
        default=0.05,
        metadata=_doc(
            "Share of calls failing on the server's side (internal, dependency) over 5 min "
            "that raises a notice (with at least 100 calls)"
        ),
    )
    smtp_host: str = field(default="", metadata=_doc("SMTP relay for email notices; empty: none"))
    smtp_port: int = field(default=25, metadata=_doc("SMTP relay port"))
    smtp_starttls: bool = field(
        default=False, metadata=_doc("Upgrade the SMTP connection with STARTTLS")
    )
    smtp_username: str = field(default="", metadata=_doc("SMTP user (empty: no login)"))
    smtp_password: str = field(default="", metadata=_doc("SMTP password"))
    smtp_from: str = field(
        default="tunnelplane@localhost", metadata=_doc("From address of email notices")
    )
