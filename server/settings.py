"""One frozen settings object, read once from ``TP_*`` environment variables.

Every setting has a safe default for local use. ``production`` mode refuses to start
while a secret is missing. How variables are named and parsed is
:mod:`server.settings_env`; the checks beyond types are :mod:`server.settings_checks`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.domain.identity.model import TierLimits
from server.domain.identity.tiers import DEFAULT_TIERS
from server.settings_checks import check
from server.settings_env import (
    AddressPolicy,
    CpuAffinity,
    LogFormat,
    Mode,
    OtelExporter,
    Provisioner,
    SettingsError,
    env_name,
    networks,
    read_env,
)
from server.settings_notify import NotificationSettings

__all__ = ["Settings", "SettingsError", "documented_settings", "env_name", "networks"]


def _doc(text: str, env: str = "") -> dict[str, Any]:
    """Field metadata: its documentation and, if not derived from the name, its variable."""
    return {"doc": text, "env": env}


@dataclass(frozen=True, slots=True)
class Settings(NotificationSettings):
    """All configuration. Build it with :meth:`from_env`; never mutate it. (The
    notification settings come first, from :class:`NotificationSettings`.)"""

    mode: Mode = field(default="development", metadata=_doc("development, sandbox or production"))
    grpc_host: str = field(default="127.0.0.1", metadata=_doc("Address the gRPC server binds"))
    grpc_port: int = field(default=50051, metadata=_doc("gRPC port; 0 picks a free port"))
    http_host: str = field(default="127.0.0.1", metadata=_doc("Address the HTTP gateway binds"))
    http_port: int = field(
        default=8080, metadata=_doc("HTTP/JSON gateway port; 0 picks one, -1 disables")
    )
    http_max_body_bytes: int = field(
        default=2 * 1024 * 1024, metadata=_doc("Largest HTTP request body (413 above)")
    )
    http_strict: bool = field(
        default=False, metadata=_doc("Reject unknown query parameters and body fields")
    )
    http_emit_defaults: bool = field(
        default=True, metadata=_doc("Include zero values in JSON responses")
    )
    http_cors_origins: str = field(
        default="", metadata=_doc("Comma-separated CORS origins (* for any)")
    )
    http_trust_forwarded_proto: bool = field(
        default=False, metadata=_doc("Believe X-Forwarded-Proto (behind a TLS proxy)")
    )
    http_docs: bool = field(default=True, metadata=_doc("Serve /api/docs (Swagger UI)"))
    http_header_timeout: float = field(
        default=10.0,
        metadata=_doc("Time a client has to send a request's headers, s (then 408 and close)"),
    )
    http_body_timeout: float = field(
        default=30.0,
        metadata=_doc("Longest pause while a client sends a request body, s (then 408 and close)"),
    )
    http_max_connections_per_address: int = field(
        default=100,
        metadata=_doc(
            "Open HTTP connections one client address may hold (503 above; 0: no cap; "
            "TP_TRUSTED_PROXIES are exempt)"
        ),
    )
    http_sse_keepalive: float = field(
        default=15.0, metadata=_doc("Seconds between `: keep-alive` comments on an idle SSE stream")
    )
    metrics_host: str = field(default="127.0.0.1", metadata=_doc("Address of /metrics"))
    metrics_port: int = field(
        default=9464, metadata=_doc("Prometheus /metrics port; 0 picks one, -1 disables")
    )
    data_dir: Path = field(
        default=Path("var"), metadata=_doc("Local state: SQLite file, generated dev keys")
    )
    database_url: str = field(
        default="",
        metadata=_doc(
            "SQLAlchemy URL; default SQLite in TP_DATA_DIR. Several hosts fail over: "
            "`postgresql://u@a:5432,b:5432/db?target_session_attrs=read-write`"
        ),
    )
    database_replica_url: str = field(
        default="", metadata=_doc("Read replica URL for lag-tolerant reads (optional)")
    )
    replica_max_lag: float = field(
        default=5.0,
        metadata=_doc(
            "Seconds a read replica may be behind before lag-tolerant reads leave it for "
            "the primary"
        ),
    )
    database_pool_size: int = field(default=10, metadata=_doc("Connections per pool"))
    database_statement_timeout: float = field(
        default=10.0, metadata=_doc("PostgreSQL statement timeout, seconds")
    )
    redis_url: str = field(
        default="", metadata=_doc("Redis URL; empty keeps shared state in-process")
    )
    redis_prefix: str = field(default="tp:", metadata=_doc("Prefix of every Redis key"))
    jwt_private_key: str = field(
        default="", metadata=_doc("PEM Ed25519 or P-256 private key that signs access tokens")
    )
    jwt_private_key_file: str = field(default="", metadata=_doc("File holding that PEM key"))
    jwt_verify_keys_file: str = field(
        default="", metadata=_doc("PEM public keys of retired signing keys, still accepted")
    )
    jwt_issuer: str = field(default="tunnelplane", metadata=_doc("`iss` of access tokens"))
    jwt_audience: str = field(default="tunnelplane-api", metadata=_doc("`aud` of access tokens"))
    access_token_ttl: float = field(default=900.0, metadata=_doc("Access token lifetime, s"))
    refresh_token_ttl: float = field(
        default=30 * 86400.0, metadata=_doc("Refresh token absolute lifetime, s")
    )
    refresh_token_idle_ttl: float = field(
        default=14 * 86400.0, metadata=_doc("Refresh token inactivity expiry, s")
    )
    page_token_secret: str = field(
        default="", metadata=_doc("Secret that encrypts and authenticates page tokens")
    )
    secrets_key: str = field(
        default="",
        metadata=_doc(
            "Base64 32-byte keys sealing secrets at rest (webhook secrets), comma-separated; "
            "the first seals, all open"
        ),
    )
    tls_cert_file: str = field(default="", metadata=_doc("PEM certificate chain for gRPC TLS"))
    tls_key_file: str = field(default="", metadata=_doc("PEM private key for gRPC TLS"))
    grpc_tls_proxies: str = field(
        default="",
        metadata=_doc(
            "CIDRs of proxies that terminate TLS in front of the gRPC port: their calls that "
            "carry x-forwarded-proto: https count as secure"
        ),
    )
    shutdown_grace: float = field(
        default=10.0, metadata=_doc("Seconds in-flight calls get to finish on SIGTERM")
    )
    workers: int = field(
        default=1,
        metadata=_doc(
            "Server processes sharing the gRPC and HTTP ports (SO_REUSEPORT); more than one "
            "needs PostgreSQL and Redis"
        ),
    )
    worker_cpu_affinity: CpuAffinity = field(
        default="off",
        metadata=_doc(
            "auto: with more than one worker, worker i runs on the i-th CPU this process may "
            "use (wrapping around); off: the kernel places them"
        ),
    )
    default_deadline: float = field(
        default=30.0, metadata=_doc("Deadline of unary calls that set none, s (streams get none)")
    )
    stream_recheck_interval: float = field(
        default=30.0,
        metadata=_doc("How often a long stream's credential is verified again, s"),
    )
    health_interval: float = field(default=5.0, metadata=_doc("Dependency probe interval, s"))
    cache_ttl: float = field(
        default=5.0,
        metadata=_doc(
            "Seconds a cached tunnel may be served (changes invalidate it at once through "
            "the event bus; this bounds a missed invalidation)"
        ),
    )
    breaker_threshold: int = field(
        default=5,
        metadata=_doc(
            "Consecutive failures that open a circuit breaker (per webhook endpoint, per "
            "proxy admin side)"
        ),
    )
    breaker_open_time: float = field(
        default=30.0,
        metadata=_doc("Seconds an open circuit breaker waits before one trial call"),
    )
    log_level: str = field(default="INFO", metadata=_doc("Python log level"))
    log_format: LogFormat = field(default="json", metadata=_doc("json or text"))
    otel_exporter: OtelExporter = field(
        default="none", metadata=_doc("Trace exporter: none, console or otlp")
    )
    otel_endpoint: str = field(default="", metadata=_doc("OTLP gRPC endpoint, host:port"))
    backup_dir: str = field(
        default="",
        metadata=_doc(
            "Where python -m server backup writes (empty: TP_DATA_DIR/backups); the server "
            "reports the newest one's age from here"
        ),
    )
    backup_keep: int = field(default=7, metadata=_doc("Backups kept; older ones are deleted"))
    slow_query_ms: float = field(
        default=250.0,
        metadata=_doc("Log a SQL statement that takes this long or longer, ms (0: never)"),
    )
    sentry_dsn: str = field(
        default="",
        metadata=_doc("Sentry DSN for unexpected errors (empty: no error tracking)"),
    )
    sentry_environment: str = field(
        default="", metadata=_doc("Sentry environment (empty: TP_MODE)")
    )
    sentry_traces_sample_rate: float = field(
        default=0.0,
        metadata=_doc("Share of calls sent to Sentry as transactions, 0 to 1"),
    )
    argon2_time_cost: int = field(default=3, metadata=_doc("Argon2id iterations"))
    argon2_memory_kib: int = field(default=65536, metadata=_doc("Argon2id memory, KiB"))
    argon2_parallelism: int = field(default=4, metadata=_doc("Argon2id lanes"))
    password_hash_concurrency: int = field(
        default=0,
        metadata=_doc(
            "Password hashes computed at once per process (0: one per CPU, shared among "
            "TP_WORKERS); one more is refused with RESOURCE_EXHAUSTED, never queued"
        ),
    )
    login_window: float = field(
        default=900.0, metadata=_doc("Window over which login failures count, s")
    )
    login_slowdown_after: int = field(
        default=3, metadata=_doc("Failures per account before attempts are spaced out")
    )
    login_lock_after: int = field(
        default=10, metadata=_doc("Failures per account from one address that lock it out")
    )
    login_ip_lock_after: int = field(default=50, metadata=_doc("Failures per IP that lock it"))
    login_lock_duration: float = field(default=900.0, metadata=_doc("How long a lock lasts, s"))
    api_key_rotation_overlap: float = field(
        default=86400.0, metadata=_doc("Default overlap of a rotated API key, s")
    )
    avatar_max_bytes: int = field(default=1 << 20, metadata=_doc("Largest avatar, bytes"))
    soft_delete_retention: float = field(
        default=30 * 86400.0, metadata=_doc("How long soft-deleted users stay restorable, s")
    )
    rate_limit_enabled: bool = field(
        default=True, metadata=_doc("Enforce rate limits, quotas and load shedding")
    )
    rate_queue_max_wait: float = field(
        default=0.5, metadata=_doc("Longest a call waits for its slot instead of a refusal, s")
    )
    rate_queue_limit: int = field(default=20, metadata=_doc("Calls one subject may have waiting"))
    rate_lease_max: int = field(
        default=256,
        metadata=_doc(
            "Most calls one replica admits from one Redis lease; 1 asks Redis every call"
        ),
    )
    rate_lease_ttl: float = field(
        default=1.0, metadata=_doc("How long a Redis lease may be spent, and counts wait, s")
    )
    ip_rate_per_minute: int = field(default=1200, metadata=_doc("Calls per minute per address"))
    ip_burst: int = field(default=200, metadata=_doc("Burst per address"))
    ip_block_after: int = field(
        default=100, metadata=_doc("Refusals within TP_IP_BLOCK_WINDOW that block an address")
    )
    ip_block_window: float = field(default=60.0, metadata=_doc("Window for those refusals, s"))
    ip_block_duration: float = field(default=900.0, metadata=_doc("How long a block lasts, s"))
    trusted_proxies: str = field(
        default="", metadata=_doc("CIDRs of proxies whose X-Forwarded-For is believed")
    )
    rate_exempt_roles: str = field(
        default="", metadata=_doc("Comma-separated roles never rate limited")
    )
    rate_exempt_ips: str = field(default="", metadata=_doc("CIDRs never rate limited"))
    adaptive_limits: bool = field(
        default=True, metadata=_doc("Tighten limits and shed load when overloaded")
    )
    load_lag_threshold: float = field(
        default=0.1, metadata=_doc("Event-loop lag that counts as full load, s")
    )
    load_inflight_threshold: int = field(
        default=1000, metadata=_doc("Calls in flight that count as full load")
    )
    violation_flush_interval: float = field(
        default=5.0, metadata=_doc("How often aggregated violations are written, s")
    )
    usage_flush_interval: float = field(
        default=60.0,
        metadata=_doc("How often monthly request counts are written to the database, s"),
    )
    tunnel_listen_host: str = field(
        default="127.0.0.1", metadata=_doc("Host tunnels' agents are told to listen on")
    )
    tunnel_port_min: int = field(default=20000, metadata=_doc("Lowest port assigned to a tunnel"))
    tunnel_port_max: int = field(default=29999, metadata=_doc("Highest port assigned to a tunnel"))
    agent_heartbeat_interval: float = field(
        default=15.0, metadata=_doc("How often agents are asked to send heartbeats, s")
    )
    agent_heartbeat_timeout: float = field(
        default=90.0, metadata=_doc("Silence after which an agent counts as disconnected, s")
    )
    agent_forget_after: float = field(
        default=600.0, metadata=_doc("How long a lost agent still degrades its tunnel, s")
    )
    agent_reconnect_within: float = field(
        default=1.0,
        metadata=_doc("Agents told to reconnect on shutdown do so within this many seconds"),
    )
    tunnel_stop_grace: float = field(
        default=10.0,
        metadata=_doc("Seconds a stopped tunnel's open connections go on before agents close them"),
    )
    proxy_port: int = field(
        default=8090,
        metadata=_doc("Public HTTP port of the embedded streaming proxy; 0: no embedded proxy"),
    )
    proxy_link_port: int = field(
        default=8091, metadata=_doc("Port on which the embedded proxy takes agents' links")
    )
    proxy_host: str = field(
        default="127.0.0.1",
        metadata=_doc("Address the embedded proxy binds, and agents are told to link to"),
    )
    proxy_links: str = field(
        default="",
        metadata=_doc(
            "Comma-separated host:port link addresses of other streaming proxies that agents "
            "link to"
        ),
    )
    proxy_provisioner: Provisioner = field(
        default="local",
        metadata=_doc(
            "Where users' own proxies (StartProxy) run: local child processes of this server "
            "(one server process only), a Deployment per proxy in Kubernetes, or off"
        ),
    )
    kubernetes_namespace: str = field(
        default="tunnelplane",
        metadata=_doc("Namespace of the proxies' Deployments (TP_PROXY_PROVISIONER=kubernetes)"),
    )
    proxy_image: str = field(
        default="tunnelplane:0.1.0",
        metadata=_doc("Container image of the proxies' pods (TP_PROXY_PROVISIONER=kubernetes)"),
    )
    kubernetes_control_plane: str = field(
        default="tunnelplane-server:50051",
        metadata=_doc(
            "The control plane's gRPC address as the proxies' pods reach it "
            "(TP_PROXY_PROVISIONER=kubernetes)"
        ),
    )
    max_proxies_per_user: int = field(
        default=3, metadata=_doc("Proxies a user may have running at once (StartProxy)")
    )
    public_domain: str = field(
        default="localhost",
        metadata=_doc("Domain under which proxies serve tunnels by host: {tunnel}.{domain}"),
    )
    probe_interval: float = field(default=30.0, metadata=_doc("Endpoint probe interval, s"))
    probe_timeout: float = field(default=5.0, metadata=_doc("Endpoint probe timeout, s"))
    probe_unhealthy_after: int = field(
        default=3, metadata=_doc("Failed probes in a row that make an endpoint unhealthy")
    )
    probe_addresses: AddressPolicy = field(
        default="auto",
        metadata=_doc(
            "Endpoint addresses probed: any, or public only (no loopback, private or "
            "link-local); auto is public in production, any otherwise"
        ),
    )
    probe_healthy_after: int = field(
        default=2, metadata=_doc("Good probes in a row that make an endpoint healthy again")
    )
    webhook_addresses: AddressPolicy = field(
        default="auto",
        metadata=_doc(
            "Webhook addresses delivered to: any, or public only (no loopback, private or "
            "link-local, checked after DNS on every connection); auto is public in "
            "production, any otherwise"
        ),
    )
    webhook_timeout: float = field(default=15.0, metadata=_doc("Webhook request timeout, s"))
    webhook_retry_schedule: str = field(
        default="5,300,1800,7200,18000,36000,36000",
        metadata=_doc("Seconds before each webhook retry (comma-separated; ±20 % jitter)"),
    )
    webhook_disable_after: float = field(
        default=432000.0, metadata=_doc("Failing time after which an endpoint is disabled, s")
    )
    webhook_claim_lease: float = field(
        default=60.0,
        metadata=_doc("How long a dispatcher holds a claimed delivery before others retry it, s"),
    )
    webhook_batch: int = field(default=100, metadata=_doc("Deliveries claimed per round"))
    webhook_concurrency: int = field(
        default=100, metadata=_doc("Webhook requests in flight at once, per process")
    )
    webhook_endpoint_concurrency: int = field(
        default=4,
        metadata=_doc(
            "Webhook requests in flight at once to one endpoint, per process (1: one at a time)"
        ),
    )
    webhook_max_per_user: int = field(default=20, metadata=_doc("Webhook endpoints per user"))
    webhook_dispatch: bool = field(
        default=True, metadata=_doc("Run the webhook dispatcher in this process")
    )
    run_operations: bool = field(
        default=True,
        metadata=_doc("Run long-running operations (webhook replays) in this process"),
    )
    default_page_size: int = field(default=50, metadata=_doc("List page size when unset"))
    max_page_size: int = field(default=1000, metadata=_doc("Largest list page size"))
    tiers: Mapping[str, TierLimits] = field(
        default_factory=lambda: dict(DEFAULT_TIERS),
        metadata=_doc("Tier limits, for example TP_TIER_FREE_MAX_TUNNELS=5 (-1: unlimited)", "-"),
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every ``TP_*`` variable; raise :class:`SettingsError` naming a bad one."""
        env = os.environ if environ is None else environ
        settings = cls(**read_env(dataclasses.fields(cls), env))
        settings.validate()
        return settings

    def validate(self) -> None:
        """Check value ranges and combinations that a type alone does not express, and in
        production mode the secrets; raise :class:`SettingsError` naming the setting."""
        check(self)

    @property
    def probe_public_only(self) -> bool:
        """Whether endpoint probes may dial only global addresses."""
        return self._public_only(self.probe_addresses)

    @property
    def webhook_public_only(self) -> bool:
        """Whether webhooks may be delivered to global addresses only."""
        return self._public_only(self.webhook_addresses)

    def _public_only(self, policy: AddressPolicy) -> bool:
        return self.mode == "production" if policy == "auto" else policy == "public"

    @property
    def agent_proxy_links(self) -> tuple[str, ...]:
        """Where agents link to streaming proxies, each once, in order: the embedded
        proxy's link address (unless TP_PROXY_PORT is 0 or TP_WORKERS is above 1: no embedded
        proxy runs then), then TP_PROXY_LINKS."""
        host = f"[{self.proxy_host}]" if ":" in self.proxy_host else self.proxy_host
        runs_embedded = self.proxy_port and self.workers == 1  # see server/compose/proxies.py
        embedded = [f"{host}:{self.proxy_link_port}"] if runs_embedded else []
        listed = [part.strip() for part in self.proxy_links.split(",") if part.strip()]
        return tuple(dict.fromkeys(embedded + listed))

    @property
    def webhook_schedule(self) -> tuple[float, ...]:
        """The retry delays, s."""
        return tuple(float(part) for part in self.webhook_retry_schedule.split(","))

    @property
    def backup_directory(self) -> Path:
        """Where backups go."""
        return Path(self.backup_dir) if self.backup_dir else self.data_dir / "backups"

    @property
    def effective_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file in the data directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'tunnelplane.db').as_posix()}"


def documented_settings() -> list[tuple[str, str, str]]:
    """(variable, default, description) rows, for the README table."""
    rows = []
    defaults = Settings()
    for f in dataclasses.fields(Settings):
        default = getattr(defaults, f.name)
        shown = "" if f.name == "tiers" else str(default)
        name = "TP_TIER_<TIER>_<LIMIT>" if f.name == "tiers" else env_name(f)
        rows.append((name, shown, str(f.metadata.get("doc", ""))))
    return rows
