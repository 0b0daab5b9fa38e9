"""One frozen settings object, read once from ``TP_*`` environment variables.

Every setting has a safe default for local use. ``production`` mode refuses to start
while a secret is missing (see :meth:`Settings.check_production`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

from server.domain.identity.model import TierLimits
from server.domain.identity.tiers import DEFAULT_TIERS

Mode = Literal["development", "sandbox", "production"]
OtelExporter = Literal["none", "console", "otlp"]
LogFormat = Literal["json", "text"]
AddressPolicy = Literal["auto", "any", "public"]

T = TypeVar("T")


class SettingsError(ValueError):
    """A ``TP_*`` variable is missing or does not parse; the message names it."""


def _doc(text: str, env: str = "") -> dict[str, Any]:
    """Field metadata: its documentation and, if not derived from the name, its variable."""
    return {"doc": text, "env": env}


@dataclass(frozen=True, slots=True)
class Settings:
    """All configuration. Build it with :meth:`from_env`; never mutate it."""

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
        default="", metadata=_doc("SQLAlchemy URL; default SQLite in TP_DATA_DIR")
    )
    database_replica_url: str = field(
        default="", metadata=_doc("Read replica URL for lag-tolerant reads (optional)")
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
    default_deadline: float = field(
        default=30.0, metadata=_doc("Deadline of unary calls that set none, s (streams get none)")
    )
    stream_recheck_interval: float = field(
        default=30.0,
        metadata=_doc("How often a long stream's credential is verified again, s"),
    )
    health_interval: float = field(default=5.0, metadata=_doc("Dependency probe interval, s"))
    log_level: str = field(default="INFO", metadata=_doc("Python log level"))
    log_format: LogFormat = field(default="json", metadata=_doc("json or text"))
    otel_exporter: OtelExporter = field(
        default="none", metadata=_doc("Trace exporter: none, console or otlp")
    )
    otel_endpoint: str = field(default="", metadata=_doc("OTLP gRPC endpoint, host:port"))
    argon2_time_cost: int = field(default=3, metadata=_doc("Argon2id iterations"))
    argon2_memory_kib: int = field(default=65536, metadata=_doc("Argon2id memory, KiB"))
    argon2_parallelism: int = field(default=4, metadata=_doc("Argon2id lanes"))
    password_hash_concurrency: int = field(
        default=0,
        metadata=_doc(
            "Password hashes computed at once (0: one per CPU); one more is refused with "
            "RESOURCE_EXHAUSTED, never queued"
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
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = env_name(f)
            if name == "-" or name not in env:
                continue
            values[f.name] = _parse(name, env[name], f.type)
        values["tiers"] = _tiers_from_env(env)
        settings = cls(**values)
        settings.validate()
        return settings

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
    def webhook_schedule(self) -> tuple[float, ...]:
        """The retry delays, s."""
        return tuple(float(part) for part in self.webhook_retry_schedule.split(","))

    @property
    def effective_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file in the data directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'tunnelplane.db').as_posix()}"

    def validate(self) -> None:  # noqa: PLR0912 - one flat list of checks reads best
        """Check value ranges that a type alone does not express."""
        positive = (
            "access_token_ttl",
            "refresh_token_ttl",
            "refresh_token_idle_ttl",
            "default_deadline",
            "stream_recheck_interval",
            "http_header_timeout",
            "http_body_timeout",
            "http_sse_keepalive",
            "health_interval",
            "argon2_time_cost",
            "argon2_memory_kib",
            "argon2_parallelism",
            "database_pool_size",
            "default_page_size",
            "max_page_size",
            "login_window",
            "login_lock_duration",
            "rate_queue_limit",
            "ip_rate_per_minute",
            "ip_burst",
            "ip_block_after",
            "ip_block_window",
            "ip_block_duration",
            "load_lag_threshold",
            "load_inflight_threshold",
            "violation_flush_interval",
            "usage_flush_interval",
            "tunnel_port_min",
            "agent_heartbeat_interval",
            "agent_heartbeat_timeout",
            "agent_forget_after",
            "probe_interval",
            "probe_timeout",
            "probe_unhealthy_after",
            "probe_healthy_after",
            "webhook_timeout",
            "webhook_disable_after",
            "webhook_claim_lease",
            "webhook_batch",
            "webhook_concurrency",
            "webhook_endpoint_concurrency",
            "webhook_max_per_user",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingsError(f"{env_name_of(name)} must be greater than zero")
        if self.shutdown_grace < 0:
            raise SettingsError("TP_SHUTDOWN_GRACE must not be negative")
        if self.password_hash_concurrency < 0:
            raise SettingsError("TP_PASSWORD_HASH_CONCURRENCY must not be negative")
        for name in ("agent_reconnect_within", "tunnel_stop_grace"):
            if not 0 <= getattr(self, name) <= 3600:
                raise SettingsError(f"{env_name_of(name)} must be between 0 and 3600 seconds")
        if not self.tunnel_port_min <= self.tunnel_port_max <= 65535:
            raise SettingsError("TP_TUNNEL_PORT_MIN..TP_TUNNEL_PORT_MAX must be a port range")
        if self.probe_timeout >= self.probe_interval:
            raise SettingsError("TP_PROBE_TIMEOUT must be shorter than TP_PROBE_INTERVAL")
        try:
            schedule = self.webhook_schedule
        except ValueError:
            schedule = ()
        if not schedule or any(not 0 < d < 10**7 for d in schedule):
            raise SettingsError("TP_WEBHOOK_RETRY_SCHEDULE must be positive seconds, a,b,c")
        if self.webhook_claim_lease <= self.webhook_timeout:
            raise SettingsError("TP_WEBHOOK_CLAIM_LEASE must be longer than TP_WEBHOOK_TIMEOUT")
        if self.default_page_size > self.max_page_size:
            raise SettingsError("TP_DEFAULT_PAGE_SIZE must not exceed TP_MAX_PAGE_SIZE")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise SettingsError("TP_TLS_CERT_FILE and TP_TLS_KEY_FILE must be set together")
        if self.http_max_connections_per_address < 0:
            raise SettingsError("TP_HTTP_MAX_CONNECTIONS_PER_ADDRESS must not be negative")
        for name in ("trusted_proxies", "rate_exempt_ips", "grpc_tls_proxies"):
            try:
                networks(getattr(self, name))
            except ValueError as exc:
                raise SettingsError(f"{env_name_of(name)}: {exc}") from None
        if self.otel_exporter == "otlp" and not self.otel_endpoint:
            raise SettingsError("TP_OTEL_ENDPOINT is required when TP_OTEL_EXPORTER=otlp")
        if self.mode == "production":
            self.check_production()

    def check_production(self) -> None:
        """Refuse generated or default secrets; name every missing setting at once."""
        missing = []
        if not (self.jwt_private_key or self.jwt_private_key_file):
            missing.append("TP_JWT_PRIVATE_KEY or TP_JWT_PRIVATE_KEY_FILE")
        if len(self.page_token_secret) < 32:
            missing.append("TP_PAGE_TOKEN_SECRET (at least 32 characters)")
        if not self.secrets_key:
            missing.append("TP_SECRETS_KEY")
        if missing:
            raise SettingsError(
                "production mode refuses generated or default secrets; set " + ", ".join(missing)
            )


def networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Parse a comma-separated CIDR list (a bare address is a /32 or /128)."""
    return tuple(
        ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip()
    )


def env_name(f: dataclasses.Field[Any]) -> str:
    """The environment variable of a settings field."""
    return str(f.metadata.get("env") or env_name_of(f.name))


def env_name_of(field_name: str) -> str:
    """``grpc_port`` -> ``TP_GRPC_PORT``."""
    return "TP_" + field_name.upper()


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


def _parse(name: str, raw: str, annotation: Any) -> Any:
    kind = str(annotation)
    parsers: dict[str, Callable[[str], Any]] = {
        "int": int,
        "float": _parse_float,
        "str": str,
        "Path": Path,
        "bool": _parse_bool,
    }
    if kind in parsers:
        try:
            return parsers[kind](raw.strip() if kind != "str" else raw)
        except ValueError:
            raise SettingsError(f"{name} must be a {kind}, got {raw!r}") from None
    choices = _literal_choices(kind)
    if raw not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}; got {raw!r}")
    return raw


def _literal_choices(kind: str) -> tuple[str, ...]:
    aliases: dict[str, Any] = {
        "Mode": Mode,
        "OtelExporter": OtelExporter,
        "LogFormat": LogFormat,
        "AddressPolicy": AddressPolicy,
    }
    return tuple(get_args(aliases[kind]))


def _parse_float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value):  # float() accepts "nan" and "inf"; no setting means them
        raise ValueError(raw)
    return value


def _parse_bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(raw)


def _tiers_from_env(env: Mapping[str, str]) -> dict[str, TierLimits]:
    known = {
        f"TP_TIER_{tier.upper()}_{f.name.upper()}"
        for tier in DEFAULT_TIERS
        for f in dataclasses.fields(TierLimits)
    }
    unknown = sorted(name for name in env if name.startswith("TP_TIER_") and name not in known)
    if unknown:
        raise SettingsError(f"unknown tier setting {unknown[0]}; known: {', '.join(sorted(known))}")
    tiers = {}
    for tier, limits in DEFAULT_TIERS.items():
        changes = {}
        for f in dataclasses.fields(TierLimits):
            name = f"TP_TIER_{tier.upper()}_{f.name.upper()}"
            if name in env:
                value = _parse(name, env[name], "int")
                if value < -1:
                    raise SettingsError(f"{name} must be -1 (unlimited) or more")
                changes[f.name] = value
        tiers[tier] = dataclasses.replace(limits, **changes)
    return tiers
