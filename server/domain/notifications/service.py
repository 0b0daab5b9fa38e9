"""Sends notices: to every operators' channel, each rate limited on its own; and to a user,
by email, when the user's preferences ask for service alerts by email."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from server.domain.identity.model import User, UserState
from server.domain.notifications.model import Notice
from server.domain.notifications.ports import Channel, Mailer
from server.domain.notifications.rules import HourlyLimit

#: Told each outcome: (channel kind, result) where result is ``sent``, ``failed``,
#: ``rate_limited`` or ``not_wanted`` (a user's preferences said no).
Count = Callable[[str, str], None]
#: Users whose hourly limits are remembered (the oldest are forgotten first).
MAX_USERS = 10_000

log = logging.getLogger("tunnelplane.notifications")


class Notifier:
    """Delivers notices; never raises (a failed channel is logged and counted)."""

    def __init__(
        self,
        channels: Sequence[Channel],
        mailer: Mailer | None,
        per_hour: int,
        count: Count,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.channels = list(channels)
        self._mailer = mailer
        self._per_hour = per_hour
        self._count = count
        self._now = monotonic
        self._limits = {c.name: HourlyLimit(per_hour) for c in self.channels}
        self._users: dict[str, HourlyLimit] = {}

    async def notify(self, notice: Notice) -> None:
        """Send ``notice`` to every channel whose hourly limit allows it."""
        for channel in self.channels:
            if not self._limits[channel.name].take(self._now()):
                self._count(channel.kind, "rate_limited")
                log.warning(
                    "notice dropped: the channel's hourly limit is reached",
                    extra={"channel": channel.name, "notice": notice.key},
                )
                continue
            try:
                await channel.send(notice)
            except Exception as exc:  # noqa: BLE001 - one channel's failure spares the rest
                self._count(channel.kind, "failed")
                log.warning(
                    "notice not delivered",
                    extra={"channel": channel.name, "notice": notice.key,
                           "error": type(exc).__name__},
                )  # fmt: skip
            else:
                self._count(channel.kind, "sent")

    async def notify_user(self, user: User, notice: Notice) -> None:
        """Mail ``notice`` to ``user`` if they want service alerts by email."""
        wanted = user.preferences.notifications
        if (
            self._mailer is None
            or user.state is not UserState.ACTIVE
            or not (wanted.email and wanted.service_alerts)
        ):
            self._count("user_email", "not_wanted")
            return
        limit = self._users.pop(user.id, None) or HourlyLimit(self._per_hour)
        self._users[user.id] = limit  # the most recent last
        if len(self._users) > MAX_USERS:
            self._users.pop(next(iter(self._users)))
        if not limit.take(self._now()):
            self._count("user_email", "rate_limited")
            return
        try:
            await self._mailer.mail(user.email, notice)
        except Exception as exc:  # noqa: BLE001 - logged and counted
            self._count("user_email", "failed")
            log.warning(
                "notice not delivered",
                extra={"channel": "user_email", "notice": notice.key, "error": type(exc).__name__},
            )
        else:
            self._count("user_email", "sent")
