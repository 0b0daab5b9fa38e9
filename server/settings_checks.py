"""The checks a settings object must pass beyond its types: ranges, settings that go
together, and the secrets production mode insists on (:meth:`server.settings.Settings.validate`)."""

from __future__ import annotations

import ipaddress
import os
import re
from typing import TYPE_CHECKING

from server.domain.webhooks.rules import parse_secret
from server.settings_env import SettingsError, env_name_of, networks

if TYPE_CHECKING:
    from server.settings import Settings

#: Settings that must be greater than zero.
POSITIVE = (
    "access_token_ttl",
    "backup_keep",
    "refresh_token_ttl",
    "refresh_token_idle_ttl",
    "default_deadline",
    "stream_recheck_interval",
    "http_header_timeout",
    "http_body_timeout",
    "http_sse_keepalive",
    "health_interval",
    "breaker_threshold",
    "cache_ttl",
    "notify_per_hour",
    "notify_down_after",
    "smtp_port",
    "breaker_open_time",
    "argon2_time_cost",
    "argon2_memory_kib",
    "argon2_parallelism",
    "database_pool_size",
    "replica_max_lag",
    "default_page_size",
    "max_page_size",
    "login_window",
    "login_lock_duration",
    "rate_queue_limit",
    "rate_lease_max",
    "rate_lease_ttl",
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
    "workers",
)


def check(settings: Settings) -> None:  # noqa: PLR0912 - one flat list of checks reads best
    """Check value ranges that a type alone does not express."""
    for name in POSITIVE:
        if getattr(settings, name) <= 0:
            raise SettingsError(f"{env_name_of(name)} must be greater than zero")
    if settings.worker_cpu_affinity == "auto" and not hasattr(os, "sched_setaffinity"):
        raise SettingsError("TP_WORKER_CPU_AFFINITY=auto needs Linux (sched_setaffinity)")
    if settings.slow_query_ms < 0:
        raise SettingsError("TP_SLOW_QUERY_MS must not be negative")
    if not 0.0 <= settings.sentry_traces_sample_rate <= 1.0:
        raise SettingsError("TP_SENTRY_TRACES_SAMPLE_RATE must be between 0 and 1")
    if settings.shutdown_grace < 0:
        raise SettingsError("TP_SHUTDOWN_GRACE must not be negative")
    if settings.password_hash_concurrency < 0:
        raise SettingsError("TP_PASSWORD_HASH_CONCURRENCY must not be negative")
    for name in ("agent_reconnect_within", "tunnel_stop_grace"):
        if not 0 <= getattr(settings, name) <= 3600:
            raise SettingsError(f"{env_name_of(name)} must be between 0 and 3600 seconds")
    if not settings.tunnel_port_min <= settings.tunnel_port_max <= 65535:
        raise SettingsError("TP_TUNNEL_PORT_MIN..TP_TUNNEL_PORT_MAX must be a port range")
    if settings.probe_timeout >= settings.probe_interval:
        raise SettingsError("TP_PROBE_TIMEOUT must be shorter than TP_PROBE_INTERVAL")
    try:
        schedule = settings.webhook_schedule
    except ValueError:
        schedule = ()
    if not schedule or any(not 0 < d < 10**7 for d in schedule):
        raise SettingsError("TP_WEBHOOK_RETRY_SCHEDULE must be positive seconds, a,b,c")
    if settings.webhook_claim_lease <= settings.webhook_timeout:
        raise SettingsError("TP_WEBHOOK_CLAIM_LEASE must be longer than TP_WEBHOOK_TIMEOUT")
    if settings.default_page_size > settings.max_page_size:
        raise SettingsError("TP_DEFAULT_PAGE_SIZE must not exceed TP_MAX_PAGE_SIZE")
    if bool(settings.tls_cert_file) != bool(settings.tls_key_file):
        raise SettingsError("TP_TLS_CERT_FILE and TP_TLS_KEY_FILE must be set together")
    if settings.http_max_connections_per_address < 0:
        raise SettingsError("TP_HTTP_MAX_CONNECTIONS_PER_ADDRESS must not be negative")
    for name in ("trusted_proxies", "rate_exempt_ips", "grpc_tls_proxies"):
        try:
            networks(getattr(settings, name))
        except ValueError as exc:
            raise SettingsError(f"{env_name_of(name)}: {exc}") from None
    check_proxies(settings)
    check_notifications(settings)
    if settings.otel_exporter == "otlp" and not settings.otel_endpoint:
        raise SettingsError("TP_OTEL_ENDPOINT is required when TP_OTEL_EXPORTER=otlp")
    if settings.mode == "production":
        check_production(settings)


_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def check_proxies(settings: Settings) -> None:
    """The embedded proxy's ports and address, the other proxies' link addresses, and the
    public domain."""
    if not 0 <= settings.proxy_port <= 65535:
        raise SettingsError("TP_PROXY_PORT must be a port, or 0 for no embedded proxy")
    if not 1 <= settings.proxy_link_port <= 65535:
        raise SettingsError("TP_PROXY_LINK_PORT must be a port")
    if settings.proxy_port and settings.proxy_port == settings.proxy_link_port:
        raise SettingsError("TP_PROXY_PORT and TP_PROXY_LINK_PORT must differ")
    if not is_host(settings.proxy_host):
        raise SettingsError("TP_PROXY_HOST must be an IP address or a host name")
    for link in settings.proxy_links.split(","):
        if link.strip() and not is_host_port(link.strip()):
            raise SettingsError(f"TP_PROXY_LINKS: {link.strip()[:100]!r} is not host:port")
    if not is_host_name(settings.public_domain):
        raise SettingsError("TP_PUBLIC_DOMAIN must be a host name, for example tunnels.example.com")


def is_host_name(text: str) -> bool:
    """Whether ``text`` is a DNS host name (letters, digits and hyphens, dot-separated)."""
    return 0 < len(text) <= 253 and all(_LABEL.fullmatch(label) for label in text.split("."))


def is_host(text: str) -> bool:
    """Whether ``text`` is an IP address or a host name."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return is_host_name(text)
    return "%" not in text


def is_host_port(text: str) -> bool:
    """Whether ``text`` is ``host:port`` (an IPv6 host in brackets, ``[::1]:8091``)."""
    host, colon, port = text.rpartition(":")
    if not colon or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        return False
    if host.startswith("[") and host.endswith("]"):
        return ":" in host and is_host(host[1:-1])
    return ":" not in host and is_host(host)


def check_notifications(settings: Settings) -> None:
    """Channels that can be used: URLs with a signing secret, addresses with a relay."""
    for url in split_list(settings.notify_webhook_urls):
        if not url.startswith(("http://", "https://")) or len(url) > 2048:
            raise SettingsError("TP_NOTIFY_WEBHOOK_URLS must be http(s) URLs")
    if settings.notify_webhook_urls:
        try:
            parse_secret(settings.notify_webhook_secret)
        except ValueError:
            raise SettingsError(
                "TP_NOTIFY_WEBHOOK_SECRET must be a whsec_ secret when TP_NOTIFY_WEBHOOK_URLS "
                "is set"
            ) from None
    addresses = split_list(settings.notify_email_to)
    if addresses and not settings.smtp_host:
        raise SettingsError("TP_NOTIFY_EMAIL_TO needs TP_SMTP_HOST")
    for address in addresses:
        if address.count("@") != 1 or len(address) > 254 or any(c in address for c in " <>,;"):
            raise SettingsError(f"TP_NOTIFY_EMAIL_TO: {address!r} is not an address")
    if not 0 < settings.notify_error_rate <= 1:
        raise SettingsError("TP_NOTIFY_ERROR_RATE must be more than 0 and at most 1")


def split_list(value: str) -> list[str]:
    """The non-empty, stripped parts of a comma-separated setting."""
    return [part.strip() for part in value.split(",") if part.strip()]


def check_production(settings: Settings) -> None:
    """Refuse generated or default secrets; name every missing setting at once."""
    missing = []
    if not (settings.jwt_private_key or settings.jwt_private_key_file):
        missing.append("TP_JWT_PRIVATE_KEY or TP_JWT_PRIVATE_KEY_FILE")
    if len(settings.page_token_secret) < 32:
        missing.append("TP_PAGE_TOKEN_SECRET (at least 32 characters)")
    if not settings.secrets_key:
        missing.append("TP_SECRETS_KEY")
    if missing:
        raise SettingsError(
            "production mode refuses generated or default secrets; set " + ", ".join(missing)
        )
