"""What makes a webhook endpoint valid: its draft checked as a whole, its resource names,
and (in production) a URL whose host resolves to public addresses only.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from server.domain.common import validation
from server.domain.common.addresses import public_only
from server.domain.common.errors import InvalidArgument, Violations
from server.domain.common.ids import is_id
from server.domain.common.names import user_id_of
from server.domain.events.model import EVENT_TYPES, TEST_EVENT
from server.domain.webhooks.headers import check_headers
from server.domain.webhooks.model import Webhook, WebhookDraft
from server.domain.webhooks.rules import check_url, compile_transform, validate_filters

MAX_RATE_LIMIT = 1000
MAX_DESCRIPTION = 1000
#: Longest wait for a URL's host to resolve when it is written.
RESOLVE_TIMEOUT = 5.0

#: Types an endpoint may subscribe to (a test event goes only to the endpoint tested).
SUBSCRIBABLE = EVENT_TYPES - {TEST_EVENT}


@dataclass(frozen=True, slots=True)
class WebhookPolicy:
    """Deployment rules for endpoints."""

    #: Production: only https URLs.
    require_https: bool = False
    #: Endpoints per user.
    max_webhooks: int = 20
    #: Production: a URL's host must resolve to global addresses only (checked when it is
    #: written, and again by the sender on every connection).
    public_only: bool = False


#: Resolves a host name to its addresses (the event loop's getaddrinfo by default).
Resolver = Callable[[str], Awaitable[list[str]]]


async def resolve(host: str) -> list[str]:
    """The addresses ``host`` resolves to (IPv6 scope ids dropped)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return [str(info[4][0]).split("%", 1)[0] for info in infos]


async def check_reachable(url: str, resolver: Resolver, field_name: str = "webhook.url") -> None:
    """:class:`InvalidArgument` unless every address ``url``'s host resolves to is global
    (no loopback, private, link-local or otherwise special address: SSRF)."""
    host = (urlsplit(url).hostname or "").strip("[]")
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT):
            addresses = await resolver(host)
    except (OSError, TimeoutError, UnicodeError):
        raise InvalidArgument.single(field_name, "the host does not resolve") from None
    if not addresses or not all(public_only(a) for a in addresses):
        raise InvalidArgument.single(
            field_name, "the host resolves to a loopback, private or link-local address"
        )


def webhook_parts(name: str, field_name: str, caller_id: str | None) -> tuple[str, str]:
    """(owner id, webhook id) of ``users/{user}/webhooks/{webhook}``."""
    parts = name.split("/")
    if len(parts) != 4 or parts[2] != "webhooks":
        raise InvalidArgument.single(field_name, "must look like users/{user}/webhooks/{webhook}")
    owner = user_id_of("/".join(parts[:2]), field_name, caller_id)
    if not is_id(parts[3], "whk"):
        raise InvalidArgument.single(field_name, "is not a valid webhook id")
    return owner, parts[3]


def delivery_parts(name: str, field_name: str, caller_id: str | None) -> tuple[str, str, str]:
    """(owner id, webhook id, delivery id) of a delivery's name."""
    parts = name.split("/")
    if len(parts) != 6 or parts[4] != "deliveries":
        raise InvalidArgument.single(
            field_name, "must look like users/{user}/webhooks/{webhook}/deliveries/{delivery}"
        )
    owner, webhook_id = webhook_parts("/".join(parts[:4]), field_name, caller_id)
    if not is_id(parts[5], "dlv"):
        raise InvalidArgument.single(field_name, "is not a valid delivery id")
    return owner, webhook_id, parts[5]


def check_draft(draft: WebhookDraft, policy: WebhookPolicy) -> WebhookDraft:
    """The draft cleaned, or :class:`InvalidArgument` naming every bad field."""
    violations = Violations()

    def checked(fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InvalidArgument as exc:
            violations.extend(exc.violations)
            return None

    if not draft.url:
        violations.add("webhook.url", "is required", "REQUIRED")
    else:
        checked(check_url, draft.url, require_https=policy.require_https)
    description = validation.free_text(
        draft.description, "webhook.description", violations, MAX_DESCRIPTION
    )
    event_types = checked(validate_filters, draft.event_types, SUBSCRIBABLE) or ()
    if draft.transform:
        checked(compile_transform, draft.transform)
    if not 0 <= draft.rate_limit <= MAX_RATE_LIMIT:
        violations.add("webhook.rate_limit", f"between 0 (no limit) and {MAX_RATE_LIMIT}")
    headers = check_headers(draft.headers, violations)
    violations.raise_if_any()
    return replace(draft, description=description, event_types=event_types, headers=headers)


def draft_of(webhook: Webhook) -> WebhookDraft:
    """The writable part of a stored endpoint."""
    return WebhookDraft(
        webhook.url,
        webhook.description,
        webhook.event_types,
        webhook.transform,
        webhook.rate_limit,
        dict(webhook.headers),
        webhook.disabled,
    )
