"""Where notices go."""

from __future__ import annotations

from typing import Protocol

from server.domain.notifications.model import Notice


class Channel(Protocol):
    """An operators' channel (a webhook URL, a list of addresses)."""

    #: ``webhook`` or ``email``: the metrics' label.
    kind: str
    #: Which one, for the log (never a secret).
    name: str

    async def send(self, notice: Notice) -> None:
        """Deliver ``notice``; raise if it could not be."""
        ...


class Mailer(Protocol):
    """Sends email to one address (users' own notices)."""

    async def mail(self, to: str, notice: Notice) -> None:
        """Deliver ``notice`` to ``to``; raise if it could not be."""
        ...
