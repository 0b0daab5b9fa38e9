"""Notifications: the operators' channels from the settings, the notifier, and the
evaluator of critical conditions (one replica at a time)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
from prometheus_client import Counter

from server.compose.events import EventsArea
from server.compose.health import HealthArea
from server.compose.infrastructure import Infrastructure
from server.domain.analytics.service import CallOutcomes
from server.domain.notifications.ports import Channel
from server.domain.notifications.service import Notifier
from server.notify.channels import EmailChannel, Smtp, WebhookChannel
from server.settings_checks import split_list
from server.storage.leader import Leadership
from server.workers.notifications import ConditionWatch, notification_loop
from server.workers.supervisor import Loop

#: Seconds between rounds of the evaluator.
INTERVAL = 5.0


@dataclass
class NotificationsArea:
    """The notifier and the evaluator feeding it."""

    notifier: Notifier
    watch: ConditionWatch
    leadership: Leadership
    session: _Session

    def loops(self) -> Sequence[Loop]:
        """The evaluator's rounds."""
        return [notification_loop(self.watch, INTERVAL)]

    async def aclose(self) -> None:
        """Close the webhook channels' connections and let go of the lead."""
        await self.session.close()
        await self.leadership.release()


class _Session:
    """One pooled HTTP session, opened on first use."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def __call__(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def build(
    infra: Infrastructure, events: EventsArea, health: HealthArea, outcomes: CallOutcomes
) -> NotificationsArea:
    """Channels from TP_NOTIFY_*; users' email through TP_SMTP_* when it is set."""
    settings = infra.settings
    session = _Session()
    smtp = (
        Smtp(
            settings.smtp_host,
            settings.smtp_port,
            settings.smtp_starttls,
            settings.smtp_username,
            settings.smtp_password,
            settings.smtp_from,
        )
        if settings.smtp_host
        else None
    )
    channels: list[Channel] = [
        WebhookChannel(url, settings.notify_webhook_secret, session)
        for url in split_list(settings.notify_webhook_urls)
    ]
    if smtp is not None and (to := split_list(settings.notify_email_to)):
        channels.append(EmailChannel(smtp, to))
    counter = Counter(
        "tunnelplane_notifications",
        "Notices by channel kind (webhook, email, user_email) and result (sent, failed, "
        "rate_limited, not_wanted).",
        ["channel", "result"],
        registry=infra.registry,
    )
    notifier = Notifier(
        channels,
        smtp,
        settings.notify_per_hour,
        lambda kind, result: counter.labels(kind, result).inc(),
    )
    leadership = Leadership(infra.db.engine, "notifications")
    watch = ConditionWatch(
        notifier,
        leadership,
        lambda: health.monitor.dependencies,
        outcomes,
        infra.db,
        infra.clock,
        down_after=settings.notify_down_after,
        error_rate=settings.notify_error_rate,
        backup_dir=settings.backup_directory,
    )
    events.local_bus.listen(watch.hear)
    return NotificationsArea(notifier, watch, leadership, session)
