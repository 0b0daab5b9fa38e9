"""The answers the streaming proxies get: access decisions and agent link grants."""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from datetime import datetime


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


# --- proxy resources -------------------------------------------------------------------


class ProxyState(enum.StrEnum):
    """A proxy's life-cycle state (stored)."""

    PROVISIONING = "provisioning"  # started; its instances are coming up
    RUNNING = "running"  # every instance healthy
    DEGRADED = "degraded"  # serving, with some instance unhealthy or missing
    STOPPING = "stopping"  # asked to stop; instances going away
    STOPPED = "stopped"  # no instance left (final)
    FAILED = "failed"  # could not be provisioned or kept up (final)


class Transition(enum.StrEnum):
    """What can happen to a proxy."""

    READY = "ready"  # every desired instance is healthy
    DEGRADE = "degrade"  # some instance unhealthy or missing
    STOP = "stop"  # the owner (or the idle timer) stops it
    STOPPED = "stopped"  # the last instance went away
    FAIL = "fail"  # the provisioner gave up


class InstanceHealth(enum.StrEnum):
    """What health checks say about one instance."""

    UNKNOWN = "unknown"  # not checked often enough yet
    HEALTHY = "healthy"
    DEGRADED = "degraded"  # answers, but says it cannot serve fully (e.g. control plane away)
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True, slots=True)
class ScalingPolicy:
    """When a proxy grows or shrinks (DOMAIN.md "Streaming proxies")."""

    min_instances: int = 1
    max_instances: int = 10
    target_cpu: int = 70  # percent
    scale_up_cpu: int = 80
    scale_down_cpu: int = 30
    #: In-flight streams per instance above which it counts as busy whatever its CPU.
    max_streams_per_instance: int = 500
    cooldown_up: float = 60.0  # s
    cooldown_down: float = 300.0
    #: Record the decisions without acting on them.
    dry_run: bool = False


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """How a proxy's instances serve, with the defaults of DOMAIN.md."""

    max_connections: int = 100  # concurrent requests per instance
    timeout: float = 30.0  # s: longest silence between chunks once a response started
    first_byte_timeout: float = 300.0  # s
    gzip_level: int = 6  # 0: off
    rate_limit_rps: int = 1000  # per instance
    rate_limit_burst: int = 100
    retries: int = 3  # connecting to an agent lane before the request is sent
    retry_delay: float = 1.0  # s
    max_body_bytes: int = 100 * 1024 * 1024
    health_check_interval: float = 30.0  # s
    health_check_timeout: float = 5.0  # s
    idle_stop: float = 600.0  # s without a request before the proxy stops; 0: never
    scaling: ScalingPolicy = field(default_factory=ScalingPolicy)


#: Health checks an instance's history keeps.
CHECKS_KEPT = 20


@dataclass(frozen=True, slots=True)
class Instance:
    """One running copy of a proxy, as the provisioner placed it and checks see it."""

    id: str  # the provisioner's name for it
    public_url: str  # where web clients reach it
    link_address: str  # host:port where agents link
    admin_url: str  # health, metrics, diagnostics and config (the control plane only)
    health: InstanceHealth = InstanceHealth.UNKNOWN
    failures: int = 0  # consecutive failed checks
    successes: int = 0  # consecutive good checks
    restarts: int = 0
    start_time: datetime | None = None
    last_check_time: datetime | None = None
    last_error: str = ""
    #: The last checks, oldest first (at most :data:`CHECKS_KEPT`).
    checks: tuple[HealthCheck, ...] = ()


@dataclass(frozen=True, slots=True)
class Proxy:
    """A user's proxy: one or more instances serving the user's tunnels."""

    id: str
    user_id: str
    display_name: str
    state: ProxyState
    state_reason: str
    config: ProxyConfig
    config_version: int
    desired_instances: int
    instances: tuple[Instance, ...]
    version: int
    create_time: datetime
    update_time: datetime
    state_time: datetime
    last_active_time: datetime  # the last request any instance served (or the start)
    request_id: str | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        """``users/{user}/proxies/{proxy}``."""
        return proxy_name(self.user_id, self.id)

    @property
    def etag(self) -> str:
        """Opaque version tag (AIP-154)."""
        digest = hashlib.blake2s(f"{self.id}:{self.version}".encode(), digest_size=8).hexdigest()
        return f'W/"{digest}"'

    @property
    def active(self) -> bool:
        """Whether it serves (or is about to)."""
        return self.state in ACTIVE_STATES


ACTIVE_STATES = frozenset({ProxyState.PROVISIONING, ProxyState.RUNNING, ProxyState.DEGRADED})
FINAL_STATES = frozenset({ProxyState.STOPPED, ProxyState.FAILED})


def proxy_name(user_id: str, proxy_id: str) -> str:
    """``users/{user}/proxies/{proxy}``."""
    return f"users/{user_id}/proxies/{proxy_id}"


@dataclass(frozen=True, slots=True)
class ConfigRevision:
    """A proxy's config as it was at one version (the history rollback draws on)."""

    proxy_id: str
    version: int
    config: ProxyConfig
    create_time: datetime
    actor: str  # users/{user}, or "" for the system
    rolled_back_from: int = 0  # the version a rollback replaced (0: an ordinary change)


class ScalingTrigger(enum.StrEnum):
    """Why the instance count was (or would have been) changed."""

    LOAD = "load"  # the autoscaler, on CPU and in-flight streams
    MANUAL = "manual"  # ScaleProxy


@dataclass(frozen=True, slots=True)
class ScalingEvent:
    """One scaling decision with what it was based on."""

    id: str
    proxy_id: str
    trigger: ScalingTrigger
    from_instances: int
    to_instances: int
    applied: bool  # False in dry-run mode
    reason: str
    cpu_percent: float  # the average over the instances when decided (-1: not measured)
    streams: int  # in-flight streams over the instances when decided
    create_time: datetime
    actor: str = ""


@dataclass(frozen=True, slots=True)
class Pool:
    """What a provisioner is asked to run for a proxy."""

    proxy_id: str
    user_id: str
    replicas: int
    config: ProxyConfig
    config_version: int


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """One health check of an instance, as its history keeps it."""

    time: datetime
    ok: bool
    error: str = ""


@dataclass(frozen=True, slots=True)
class BasicCredentials:
    """The user name and password of a web client's ``Authorization: Basic`` header, as the
    proxy decoded them. The password is secret: it is neither logged nor kept."""

    username: str
    password: str = field(repr=False)
