"""The answers the streaming proxies get: access decisions and agent link grants."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Refusal(enum.StrEnum):
    """Why a web request may not use a tunnel."""

    NOT_FOUND = "not_found"  # no such tunnel, or one the caller may not know of
    #: Private, and no credential came with the request; or basic, and no basic
    #: credentials came with it, or wrong ones.
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"  # the credential, or the client's address, may not use it
    NOT_RUNNING = "not_running"  # the owner has not started it (or it failed)


@dataclass(frozen=True, slots=True)
class AccessDecision:
    """Whether a web request may use a tunnel, and for how long a proxy may reuse that."""

    refusal: Refusal | None  # None: allowed
    #: The tunnel's name, ``users/{user}/tunnels/{tunnel}``; "" when the caller may not
    #: know it.
    tunnel: str
    #: Seconds the proxy may reuse the decision for the same tunnel, credential and address.
    cache_for: float
    #: The tunnel takes HTTP Basic credentials (the proxy asks for them, and strips them).
    basic: bool = False

    @property
    def allowed(self) -> bool:
        """Whether the request may go through."""
        return self.refusal is None


@dataclass(frozen=True, slots=True)
class LinkGrant:
    """An agent may link to proxies for a tunnel."""

    tunnel: str
    #: Seconds the proxy may reuse the grant for the same key and tunnel.
    cache_for: float


@dataclass(frozen=True, slots=True)
class BasicCredentials:
    """The user name and password of a web client's ``Authorization: Basic`` header, as the
    proxy decoded them. The password is secret: it is neither logged nor kept."""

    username: str
    password: str = field(repr=False)
