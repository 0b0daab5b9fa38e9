"""The event log's record: something that happened to a user's resource, and every type
the log holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

#: Every type the log holds; webhooks may subscribe to these (and to prefixes).
EVENT_TYPES = frozenset(
    {
        "user.created",
        "user.tier_changed",
        "user.role_changed",
        "user.deleted",
        "user.suspended",
        "user.reactivated",
        "tunnel.created",
        "tunnel.updated",
        "tunnel.status_changed",
        "tunnel.health_changed",
        "tunnel.failover",
        "tunnel.deleted",
        "tunnel.agents_reset",
        "endpoint.disabled",
        "webhook.test",
        "proxy.started",
        "proxy.state_changed",
        "proxy.recovered",
        "proxy.instance_restarted",
        "proxy.failed",
        "proxy.stopped",
        "proxy.scaled",
        "proxy.config_changed",
        "proxy.updated",
    }
)


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened to a user's resource."""

    id: str
    type: str
    subject: str
    user_id: str  # the owner of the subject
    actor: str  # users/{user}, or "" for the system
    time: datetime
    payload: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """``users/{user}/events/{event}``."""
        return f"users/{self.user_id}/events/{self.id}"


#: Sent by TestWebhook to the endpoint tested, and to no other.
TEST_EVENT = "webhook.test"
