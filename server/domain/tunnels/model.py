"""Tunnels' records: a tunnel with its endpoints, status and configuration; its agents'
sessions; its shares and share links. Plain frozen dataclasses and enums.

Traffic reports and their totals live in :mod:`server.domain.tunnels.traffic`, with the
arithmetic that keeps them consistent.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from server.domain.identity.model import ShareRole, Tier
from server.domain.tunnels.traffic import DailyUsage, Totals

# --- tunnels and their endpoints -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """An endpoint as its owner configures it: URL, priority (0 first) and weight."""

    url: str
    priority: int = 0
    weight: int = 1


class EndpointHealth(enum.StrEnum):
    """What the probes say about an endpoint (stored)."""

    UNKNOWN = "unknown"  # not decided yet: a new endpoint
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


DEFAULT_IDLE_TIMEOUT = 60.0


class TunnelState(enum.StrEnum):
    """Life-cycle state (stored)."""

    CREATED = "created"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    ERROR = "error"


class TunnelHealth(enum.StrEnum):
    """Health, apart from the state (stored)."""

    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    DOWN = "down"


class Transition(enum.StrEnum):
    """What can happen to a tunnel."""

    START = "start"
    STOP = "stop"
    AGENT_UP = "agent_up"  # the first agent connected
    AGENT_DOWN = "agent_down"  # the last agent went away
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Status:
    """The part of a tunnel the state machine changes."""

    state: TunnelState
    running: bool  # whether the owner wants it to carry traffic
    reason: str = ""


class WebAccess(enum.StrEnum):
    """Who may reach a tunnel through a streaming proxy (stored in its config)."""

    PRIVATE = "private"  # the owner and share holders, with a credential that may use it
    PUBLIC = "public"  # anyone
    IP_ALLOWLIST = "ip_allowlist"  # clients whose address is in ``allowed_networks``
    BASIC = "basic"  # clients that give the tunnel's user name and password (HTTP Basic)


@dataclass(frozen=True, slots=True)
class TunnelConfig:
    """How a tunnel carries traffic, and who may reach it through a proxy.

    The basic password is never kept as it was given: a request carries it in
    ``basic_password``, which the use case replaces by its hash before anything is stored
    (a stored config has an empty ``basic_password``).
    """

    max_connections: int = 0  # 0: the tier's limit
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    compression: bool = False
    web_access: WebAccess = WebAccess.PRIVATE
    #: With ``IP_ALLOWLIST``: the networks allowed, as normalized CIDRs.
    allowed_networks: tuple[str, ...] = ()
    #: With ``BASIC``: the user name web clients give.
    basic_username: str = ""
    #: A new basic password, as a request gave it ("": keep the stored one).
    basic_password: str = field(default="", repr=False)
    #: With ``BASIC``: the stored password's Argon2id hash.
    basic_password_hash: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An endpoint with its probe state."""

    spec: EndpointSpec
    health: EndpointHealth = EndpointHealth.UNKNOWN
    failures: int = 0
    successes: int = 0
    last_probe_time: datetime | None = None
    last_error: str = ""
    next_probe_time: datetime | None = None  # None: as soon as possible


@dataclass(frozen=True, slots=True)
class Tunnel:
    """A tunnel as stored."""

    id: str
    user_id: str
    display_name: str
    description: str
    status: Status
    health: TunnelHealth
    config: TunnelConfig
    endpoints: tuple[Endpoint, ...]
    active_endpoint: str
    listen_port: int
    connected_agents: int
    lost_agents: int
    version: int
    create_time: datetime
    update_time: datetime
    state_time: datetime
    request_id: str | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        """``users/{user}/tunnels/{tunnel}``."""
        return tunnel_name(self.user_id, self.id)

    @property
    def state(self) -> TunnelState:
        """The life-cycle state."""
        return self.status.state

    @property
    def etag(self) -> str:
        """Opaque version tag (AIP-154)."""
        digest = hashlib.blake2s(f"{self.id}:{self.version}".encode(), digest_size=8).hexdigest()
        return f'W/"{digest}"'


def tunnel_name(user_id: str, tunnel_id: str) -> str:
    """``users/{user}/tunnels/{tunnel}``."""
    return f"users/{user_id}/tunnels/{tunnel_id}"


@dataclass(frozen=True, slots=True)
class TunnelDraft:
    """The writable part of a tunnel, as a caller sent it."""

    display_name: str = ""
    description: str = ""
    config: TunnelConfig = field(default_factory=TunnelConfig)
    endpoints: tuple[EndpointSpec, ...] = ()


# --- agents ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """What an agent says first."""

    tunnel: str
    agent_id: str
    version: str = ""
    hostname: str = ""
    os: str = ""


@dataclass(frozen=True, slots=True)
class AgentSession:
    """An agent of a tunnel, connected now or recently."""

    tunnel_id: str
    agent_id: str
    api_key_id: str
    version: str
    hostname: str
    os: str
    connected: bool
    active_connections: int
    connect_time: datetime
    last_seen_time: datetime
    last_report_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class TunnelTraffic:
    """A tunnel's traffic totals and what its agents last said."""

    totals: Totals
    active_connections: int
    last_report_time: datetime | None


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Usage of one tunnel on one day, as stored."""

    tunnel_id: str
    tunnel_name: str
    user_id: str
    tier: Tier
    usage: DailyUsage


# --- sharing ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Share:
    """A user's access to someone else's tunnel."""

    tunnel_id: str
    owner_id: str
    grantee_id: str
    role: ShareRole
    expire_time: datetime | None
    create_time: datetime
    creator_id: str
    #: The grantee whose share this one was granted through ("" : the owner or an admin).
    parent_grantee_id: str = ""

    @property
    def name(self) -> str:
        """``users/{owner}/tunnels/{tunnel}/shares/{grantee}``."""
        return share_name(self.owner_id, self.tunnel_id, self.grantee_id)

    def expired(self, now: datetime) -> bool:
        """Whether the share no longer grants anything."""
        return self.expire_time is not None and self.expire_time <= now


@dataclass(frozen=True, slots=True)
class ShareLink:
    """A link that grants a share to whoever accepts it, a limited number of times."""

    id: str
    tunnel_id: str
    owner_id: str
    role: ShareRole
    max_uses: int
    use_count: int
    expire_time: datetime
    share_ttl: timedelta | None
    create_time: datetime
    revoke_time: datetime | None = None
    creator_id: str = ""
    #: The share the link was made through ("": by the owner or an admin).
    parent_grantee_id: str = ""

    @property
    def name(self) -> str:
        """``users/{owner}/tunnels/{tunnel}/shareLinks/{link}``."""
        return f"{tunnel_name(self.owner_id, self.tunnel_id)}/shareLinks/{self.id}"

    def active(self, now: datetime) -> bool:
        """Whether the link can still be accepted."""
        return (
            self.revoke_time is None and self.expire_time > now and self.use_count < self.max_uses
        )


@dataclass(frozen=True, slots=True)
class SharedTunnel:
    """A tunnel shared with someone, with their role on it."""

    tunnel: Tunnel
    role: ShareRole
    expire_time: datetime | None
    create_time: datetime
    parent_grantee_id: str = ""


def share_name(owner_id: str, tunnel_id: str, grantee_id: str) -> str:
    """``users/{owner}/tunnels/{tunnel}/shares/{grantee}`` ("" for no grantee)."""
    return f"{tunnel_name(owner_id, tunnel_id)}/shares/{grantee_id}" if grantee_id else ""
