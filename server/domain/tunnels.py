"""Tunnels: what one is, its state machine, its health and its configuration rules."""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field, replace
from datetime import datetime

from server.domain import validation
from server.domain.endpoints import EndpointHealth, EndpointSpec
from server.domain.ids import is_id
from server.domain.names import user_id_of
from server.errors import FailedPrecondition, InvalidArgument, PreconditionViolation, Violations
from server.settings import TierLimits

MAX_NAME = 255
MAX_DESCRIPTION = 1000
DEFAULT_IDLE_TIMEOUT = 60.0
MIN_IDLE_TIMEOUT, MAX_IDLE_TIMEOUT = 1.0, 3600.0


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


def transition(  # noqa: PLR0911 - one return per edge of the machine reads best
    status: Status, event: Transition, *, agents: int, reason: str = ""
) -> Status:
    """The status after ``event``; ``FailedPrecondition`` naming the state if illegal.

    ``created → connecting → connected ⇄ disconnected``, any state → ``error``; stop
    brings a started tunnel to ``disconnected``. Agent comings and goings only move a
    running tunnel. Every move into ``disconnected`` or ``error`` says why (``reason``, or
    a default); a start, or an agent connecting, clears the reason.
    """
    state = status.state
    if event is Transition.FAIL:
        return Status(TunnelState.ERROR, status.running, reason or "failed")
    if event is Transition.START:
        if status.running and state is not TunnelState.ERROR:
            raise _illegal(state, event)
        return Status(TunnelState.CONNECTED if agents else TunnelState.CONNECTING, running=True)
    if event is Transition.STOP:
        if not status.running and state is not TunnelState.ERROR:
            raise _illegal(state, event)
        return Status(TunnelState.DISCONNECTED, running=False, reason=reason or "stopped")
    if not status.running or state is TunnelState.ERROR:
        return status  # agents of a stopped or failed tunnel change nothing
    if event is Transition.AGENT_UP:
        return replace(status, state=TunnelState.CONNECTED, reason="")
    if state is TunnelState.CONNECTED:  # AGENT_DOWN
        return Status(TunnelState.DISCONNECTED, running=True, reason=reason or "no agent is left")
    return status


#: Every (from, to) pair the machine can produce; anything else is a bug.
LEGAL = frozenset(
    {
        (TunnelState.CREATED, TunnelState.CONNECTING),
        (TunnelState.CREATED, TunnelState.CONNECTED),
        (TunnelState.CONNECTING, TunnelState.CONNECTED),
        (TunnelState.CONNECTING, TunnelState.DISCONNECTED),
        (TunnelState.CONNECTED, TunnelState.DISCONNECTED),
        (TunnelState.DISCONNECTED, TunnelState.CONNECTING),
        (TunnelState.DISCONNECTED, TunnelState.CONNECTED),
        (TunnelState.ERROR, TunnelState.CONNECTING),
        (TunnelState.ERROR, TunnelState.CONNECTED),
        (TunnelState.ERROR, TunnelState.DISCONNECTED),
    }
    | {(s, TunnelState.ERROR) for s in TunnelState}
)


def _illegal(state: TunnelState, event: Transition) -> FailedPrecondition:
    return FailedPrecondition(
        f"cannot {event.value} a tunnel that is {state.value}",
        [PreconditionViolation("STATE", "tunnel", f"the tunnel is {state.value}")],
        reason="ILLEGAL_TRANSITION",
        metadata={"state": state.value, "transition": event.value},
    )


def stop_reason(owner_id: str, actor: str) -> str:
    """What a stopped tunnel's ``state_reason`` says: who stopped it."""
    by = "the owner" if actor == f"users/{owner_id}" else actor
    return f"stopped by {by}" if by else "stopped"


def health_of(
    running: bool, connected: int, lost: int, endpoints: list[EndpointHealth]
) -> TunnelHealth:
    """Health from the agents and the endpoints: unknown until the tunnel is started and an
    agent has connected to it (healthy endpoints carry nothing without an agent)."""
    if not running or (connected == 0 and lost == 0):
        return TunnelHealth.UNKNOWN
    if connected == 0:
        return TunnelHealth.DOWN
    by_endpoints = _endpoints(endpoints) if endpoints else TunnelHealth.HEALTHY
    if by_endpoints is TunnelHealth.DOWN:
        return TunnelHealth.DOWN
    if lost or by_endpoints is TunnelHealth.DEGRADED:
        return TunnelHealth.DEGRADED
    return by_endpoints


def _endpoints(endpoints: list[EndpointHealth]) -> TunnelHealth:
    if all(h is EndpointHealth.UNHEALTHY for h in endpoints):
        return TunnelHealth.DOWN
    if any(h is EndpointHealth.UNHEALTHY for h in endpoints):
        return TunnelHealth.DEGRADED
    if all(h is EndpointHealth.UNKNOWN for h in endpoints):
        return TunnelHealth.UNKNOWN
    return TunnelHealth.HEALTHY


@dataclass(frozen=True, slots=True)
class TunnelConfig:
    """How a tunnel carries traffic."""

    max_connections: int = 0  # 0: the tier's limit
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    compression: bool = False


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


def probe_now(tunnel: Tunnel) -> Tunnel:
    """The tunnel with every endpoint due for a probe at once (a start: endpoints of a
    tunnel that is not started are not probed, so what is known of them may be old)."""
    endpoints = tuple(replace(e, next_probe_time=None) for e in tunnel.endpoints)
    return replace(tunnel, endpoints=endpoints)


def tunnel_name(user_id: str, tunnel_id: str) -> str:
    """``users/{user}/tunnels/{tunnel}``."""
    return f"users/{user_id}/tunnels/{tunnel_id}"


def tunnel_parts(
    name: str, field_name: str, caller_id: str | None, *, suffix: str = ""
) -> tuple[str, str]:
    """(owner id, tunnel id) of ``users/{user}/tunnels/{tunnel}{suffix}``."""
    parts = name.split("/")
    tail = suffix.strip("/").split("/") if suffix else []
    if len(parts) != 4 + len(tail) or parts[2] != "tunnels" or parts[4:] != tail:
        raise InvalidArgument.single(
            field_name, f"must look like users/{{user}}/tunnels/{{tunnel}}{suffix}"
        )
    owner = user_id_of("/".join(parts[:2]), field_name, caller_id)
    if not is_id(parts[3], "tun"):
        raise InvalidArgument.single(field_name, "is not a valid tunnel id")
    return owner, parts[3]


def check_text(display_name: str, description: str, violations: Violations) -> tuple[str, str]:
    """The cleaned name (1-255 characters) and description (at most 1000)."""
    name = validation.display_name(display_name, "tunnel.display_name", violations, MAX_NAME)
    text = validation.free_text(description, "tunnel.description", violations, MAX_DESCRIPTION)
    return name, text


def check_config(config: TunnelConfig, limits: TierLimits, violations: Violations) -> None:
    """Max connections within the tier's limit; timeout within bounds."""
    prefix = "tunnel.config."
    tier_max = limits.max_concurrent_connections
    if config.max_connections < 0:
        violations.add(prefix + "max_connections", "must not be negative")
    elif tier_max >= 0 and config.max_connections > tier_max:
        violations.add(
            prefix + "max_connections", f"the tier allows at most {tier_max} connections"
        )
    if not MIN_IDLE_TIMEOUT <= config.idle_timeout <= MAX_IDLE_TIMEOUT:
        violations.add(prefix + "idle_timeout", "must be between 1 s and 1 h")
