"""Reading ``TP_*`` variables into one frozen Settings (server/settings.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from server.domain.identity.model import TierLimits
from server.domain.identity.tiers import DEFAULT_TIERS
from server.settings import Settings, SettingsError, documented_settings, env_name

SECRET = "p" * 32
PRODUCTION = {
    "TP_MODE": "production",
    "TP_JWT_PRIVATE_KEY_FILE": "/run/secrets/jwt.pem",
    "TP_PAGE_TOKEN_SECRET": SECRET,
    "TP_SECRETS_KEY": "A" * 43 + "=",
}


def test_no_variables_gives_the_defaults() -> None:
    assert Settings.from_env({}) == Settings()
    assert Settings().tiers == DEFAULT_TIERS


@pytest.mark.parametrize(
    ("env", "attribute", "value"),
    [
        ({"TP_GRPC_PORT": "6000"}, "grpc_port", 6000),
        ({"TP_GRPC_PORT": " 0 "}, "grpc_port", 0),
        ({"TP_METRICS_PORT": "-1"}, "metrics_port", -1),
        ({"TP_ACCESS_TOKEN_TTL": "60.5"}, "access_token_ttl", 60.5),
        ({"TP_ACCESS_TOKEN_TTL": "120"}, "access_token_ttl", 120.0),
        ({"TP_SHUTDOWN_GRACE": "0"}, "shutdown_grace", 0.0),
        ({"TP_MODE": "sandbox"}, "mode", "sandbox"),
        ({"TP_LOG_FORMAT": "text"}, "log_format", "text"),
        ({"TP_OTEL_EXPORTER": "console"}, "otel_exporter", "console"),
        ({"TP_DATA_DIR": "/srv/tp"}, "data_dir", Path("/srv/tp")),
        ({"TP_REDIS_PREFIX": " spaced: "}, "redis_prefix", " spaced: "),
        ({"TP_DATABASE_URL": "postgresql://db/tp"}, "database_url", "postgresql://db/tp"),
        ({"TP_LOG_LEVEL": "DEBUG"}, "log_level", "DEBUG"),
    ],
)
def test_variables_are_parsed_to_their_types(
    env: dict[str, str], attribute: str, value: Any
) -> None:
    settings = Settings.from_env(env)
    assert getattr(settings, attribute) == value
    assert type(getattr(settings, attribute)) is type(value)


@pytest.mark.parametrize(
    "f", [f for f in dataclasses.fields(Settings) if f.name != "tiers"], ids=lambda f: f.name
)
def test_every_setting_reads_back_its_own_default(f: dataclasses.Field[Any]) -> None:
    default = getattr(Settings(), f.name)
    assert getattr(Settings.from_env({env_name(f): str(default)}), f.name) == default


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TP_GRPC_PORT": "abc"}, "TP_GRPC_PORT must be a int, got 'abc'"),
        ({"TP_GRPC_PORT": "50051.0"}, "TP_GRPC_PORT must be a int"),
        ({"TP_GRPC_PORT": ""}, "TP_GRPC_PORT must be a int"),
        ({"TP_ACCESS_TOKEN_TTL": "soon"}, "TP_ACCESS_TOKEN_TTL must be a float, got 'soon'"),
        ({"TP_ACCESS_TOKEN_TTL": "nan"}, "TP_ACCESS_TOKEN_TTL must be a float"),
        ({"TP_HEALTH_INTERVAL": "inf"}, "TP_HEALTH_INTERVAL must be a float"),
        ({"TP_SHUTDOWN_GRACE": "-inf"}, "TP_SHUTDOWN_GRACE must be a float"),
        ({"TP_MODE": "prod"}, "TP_MODE must be one of development, sandbox, production"),
        ({"TP_MODE": "Production"}, "TP_MODE must be one of"),
        ({"TP_LOG_FORMAT": "xml"}, "TP_LOG_FORMAT must be one of json, text; got 'xml'"),
        ({"TP_OTEL_EXPORTER": "jaeger"}, "TP_OTEL_EXPORTER must be one of none, console, otlp"),
        ({"TP_ACCESS_TOKEN_TTL": "0"}, "TP_ACCESS_TOKEN_TTL must be greater than zero"),
        ({"TP_ARGON2_MEMORY_KIB": "-1"}, "TP_ARGON2_MEMORY_KIB must be greater than zero"),
        ({"TP_MAX_PAGE_SIZE": "0"}, "TP_MAX_PAGE_SIZE must be greater than zero"),
        ({"TP_SHUTDOWN_GRACE": "-1"}, "TP_SHUTDOWN_GRACE must not be negative"),
        (
            {"TP_DEFAULT_PAGE_SIZE": "2000"},
            "TP_DEFAULT_PAGE_SIZE must not exceed TP_MAX_PAGE_SIZE",
        ),
        ({"TP_TLS_CERT_FILE": "cert.pem"}, "TP_TLS_CERT_FILE and TP_TLS_KEY_FILE"),
        ({"TP_TLS_KEY_FILE": "key.pem"}, "TP_TLS_CERT_FILE and TP_TLS_KEY_FILE"),
        ({"TP_OTEL_EXPORTER": "otlp"}, "TP_OTEL_ENDPOINT is required when TP_OTEL_EXPORTER=otlp"),
        ({"TP_TIER_FREE_MAX_TUNNELS": "many"}, "TP_TIER_FREE_MAX_TUNNELS must be a int"),
        ({"TP_TIER_PREMIUM_REQUESTS_PER_MINUTE": "-2"}, "TP_TIER_PREMIUM_REQUESTS_PER_MINUTE must"),
        ({"TP_PROXY_PORT": "-1"}, "TP_PROXY_PORT must be a port, or 0"),
        ({"TP_PROXY_PORT": "65536"}, "TP_PROXY_PORT must be a port"),
        ({"TP_PROXY_LINK_PORT": "0"}, "TP_PROXY_LINK_PORT must be a port"),
        ({"TP_PROXY_PORT": "9000", "TP_PROXY_LINK_PORT": "9000"}, "must differ"),
        ({"TP_PROXY_HOST": ""}, "TP_PROXY_HOST must be"),
        ({"TP_PROXY_HOST": "proxy host"}, "TP_PROXY_HOST must be"),
        ({"TP_PROXY_LINKS": "proxy-a:8091,proxy-b"}, "TP_PROXY_LINKS: 'proxy-b' is not host:port"),
        ({"TP_PROXY_LINKS": "proxy-a:0"}, "TP_PROXY_LINKS"),
        ({"TP_PROXY_LINKS": "proxy-a:80000"}, "TP_PROXY_LINKS"),
        ({"TP_PROXY_LINKS": "::1:8091"}, "TP_PROXY_LINKS"),  # IPv6 needs brackets
        ({"TP_PROXY_LINKS": "[proxy-a]:8091"}, "TP_PROXY_LINKS"),
        ({"TP_PROXY_LINKS": "http://proxy-a:8091"}, "TP_PROXY_LINKS"),
        ({"TP_PROXY_LINKS": "proxy-a:\uff18\uff10\uff19\uff11"}, "TP_PROXY_LINKS"),  # fullwidth
        ({"TP_PUBLIC_DOMAIN": ""}, "TP_PUBLIC_DOMAIN must be a host name"),
        ({"TP_PUBLIC_DOMAIN": "tunnels.example.com."}, "TP_PUBLIC_DOMAIN"),
        ({"TP_PUBLIC_DOMAIN": "-bad.example.com"}, "TP_PUBLIC_DOMAIN"),
        ({"TP_PUBLIC_DOMAIN": "*.example.com"}, "TP_PUBLIC_DOMAIN"),
        ({"TP_PUBLIC_DOMAIN": "https://example.com"}, "TP_PUBLIC_DOMAIN"),
        ({"TP_NOTIFY_EMAIL_TO": "ops@example.com"}, "TP_NOTIFY_EMAIL_TO needs TP_SMTP_HOST"),
        (
            {"TP_NOTIFY_EMAIL_TO": "ops@example.com, not an address", "TP_SMTP_HOST": "mx"},
            "TP_NOTIFY_EMAIL_TO: 'not an address' is not an address",
        ),
        ({"TP_NOTIFY_WEBHOOK_URLS": "https://h.example"}, "TP_NOTIFY_WEBHOOK_SECRET must be"),
        (
            {"TP_NOTIFY_WEBHOOK_URLS": "ftp://h", "TP_NOTIFY_WEBHOOK_SECRET": "whsec_AA=="},
            "TP_NOTIFY_WEBHOOK_URLS must be http(s) URLs",
        ),
        ({"TP_NOTIFY_ERROR_RATE": "1.5"}, "TP_NOTIFY_ERROR_RATE must be"),
        ({"TP_NOTIFY_PER_HOUR": "0"}, "TP_NOTIFY_PER_HOUR must be greater than zero"),
        ({"TP_BREAKER_THRESHOLD": "0"}, "TP_BREAKER_THRESHOLD must be greater than zero"),
        ({"TP_REPLICA_MAX_LAG": "-1"}, "TP_REPLICA_MAX_LAG must be greater than zero"),
    ],
)
def test_bad_values_are_refused_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "env",
    [
        {"TP_TLS_CERT_FILE": "c.pem", "TP_TLS_KEY_FILE": "k.pem"},
        {"TP_OTEL_EXPORTER": "otlp", "TP_OTEL_ENDPOINT": "collector:4317"},
        {"TP_DEFAULT_PAGE_SIZE": "1000", "TP_MAX_PAGE_SIZE": "1000"},
        {"TP_PROXY_PORT": "0", "TP_PROXY_LINK_PORT": "8091"},
        {"TP_PROXY_LINKS": "proxy-a.internal:8091,10.0.0.5:8091,[2001:db8::1]:9000"},
        {"TP_PUBLIC_DOMAIN": "tunnels.example.com", "TP_PROXY_HOST": "::1"},
    ],
)
def test_consistent_combinations_are_accepted(env: dict[str, str]) -> None:
    settings = Settings.from_env(env)
    for variable, value in env.items():
        assert str(getattr(settings, variable.removeprefix("TP_").lower())) == value


@pytest.mark.parametrize(
    ("env", "links"),
    [
        ({}, ("127.0.0.1:8091",)),  # the embedded proxy
        ({"TP_PROXY_PORT": "0"}, ()),  # none
        ({"TP_PROXY_HOST": "::1", "TP_PROXY_LINK_PORT": "9001"}, ("[::1]:9001",)),
        (
            {"TP_PROXY_LINKS": " proxy-b:8091 ,proxy-a:8091,,127.0.0.1:8091,proxy-b:8091"},
            ("127.0.0.1:8091", "proxy-b:8091", "proxy-a:8091"),
        ),
        ({"TP_PROXY_PORT": "0", "TP_PROXY_LINKS": "proxy-a:8091"}, ("proxy-a:8091",)),
    ],
)
def test_agents_link_to_the_embedded_proxy_then_the_listed_ones_each_once(
    env: dict[str, str], links: tuple[str, ...]
) -> None:
    assert Settings.from_env(env).agent_proxy_links == links


# --- production mode -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("removed", "missing"),
    [
        (
            ["TP_JWT_PRIVATE_KEY_FILE", "TP_PAGE_TOKEN_SECRET"],
            ["TP_JWT_PRIVATE_KEY or TP_JWT_PRIVATE_KEY_FILE", "TP_PAGE_TOKEN_SECRET"],
        ),
        (["TP_JWT_PRIVATE_KEY_FILE"], ["TP_JWT_PRIVATE_KEY or TP_JWT_PRIVATE_KEY_FILE"]),
        (["TP_PAGE_TOKEN_SECRET"], ["TP_PAGE_TOKEN_SECRET"]),
        (["TP_SECRETS_KEY"], ["TP_SECRETS_KEY"]),
    ],
)
def test_production_refuses_missing_secrets_and_names_them(
    removed: list[str], missing: list[str]
) -> None:
    env = {k: v for k, v in PRODUCTION.items() if k not in removed}
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    message = str(caught.value)
    assert message.startswith("production mode refuses")
    for name in missing:
        assert name in message
    if "TP_PAGE_TOKEN_SECRET" not in removed:
        assert "TP_PAGE_TOKEN_SECRET" not in message


def test_production_refuses_a_short_page_token_secret() -> None:
    with pytest.raises(SettingsError, match=r"TP_PAGE_TOKEN_SECRET \(at least 32 characters\)"):
        Settings.from_env({**PRODUCTION, "TP_PAGE_TOKEN_SECRET": SECRET[:31]})


@pytest.mark.parametrize(
    "key", [{"TP_JWT_PRIVATE_KEY_FILE": "/run/secrets/jwt.pem"}, {"TP_JWT_PRIVATE_KEY": "PEM"}]
)
def test_production_starts_with_its_secrets(key: dict[str, str]) -> None:
    env = {
        "TP_MODE": "production",
        "TP_PAGE_TOKEN_SECRET": SECRET,
        "TP_SECRETS_KEY": PRODUCTION["TP_SECRETS_KEY"],
        **key,
    }
    settings = Settings.from_env(env)
    assert settings.mode == "production"
    assert settings.page_token_secret == SECRET


@pytest.mark.parametrize("mode", ["development", "sandbox"])
def test_other_modes_start_without_secrets(mode: str) -> None:
    assert Settings.from_env({"TP_MODE": mode}).mode == mode


# --- tiers -----------------------------------------------------------------------------


def test_tier_limits_can_be_overridden_one_at_a_time() -> None:
    settings = Settings.from_env(
        {
            "TP_TIER_FREE_MAX_TUNNELS": "5",
            "TP_TIER_PREMIUM_TRANSFER_BYTES_PER_MONTH": "1099511627776",
            "TP_TIER_ENTERPRISE_REQUESTS_PER_MINUTE": "-1",
        }
    )
    assert settings.tiers["free"] == dataclasses.replace(DEFAULT_TIERS["free"], max_tunnels=5)
    assert settings.tiers["premium"].transfer_bytes_per_month == 1024**4
    assert settings.tiers["premium"].max_tunnels == DEFAULT_TIERS["premium"].max_tunnels
    assert settings.tiers["enterprise"] == dataclasses.replace(
        DEFAULT_TIERS["enterprise"], requests_per_minute=-1
    )
    assert set(settings.tiers) == {"free", "premium", "enterprise"}


def test_every_tier_limit_has_a_variable() -> None:
    env = {
        f"TP_TIER_{tier.upper()}_{f.name.upper()}": "7"
        for tier in DEFAULT_TIERS
        for f in dataclasses.fields(TierLimits)
    }
    settings = Settings.from_env(env)
    sevens = TierLimits(*[7] * len(dataclasses.fields(TierLimits)))
    assert all(limits == sevens for limits in settings.tiers.values())


def test_defaults_are_not_shared_between_instances() -> None:
    first = Settings.from_env({"TP_TIER_FREE_MAX_TUNNELS": "9"})
    assert Settings().tiers["free"].max_tunnels == DEFAULT_TIERS["free"].max_tunnels == 3
    assert first.tiers is not Settings().tiers


# --- environment and documentation -----------------------------------------------------


def test_from_env_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TP_GRPC_PORT", "7007")
    monkeypatch.setenv("TP_TIER_FREE_MAX_TUNNELS", "4")
    settings = Settings.from_env()
    assert settings.grpc_port == 7007
    assert settings.tiers["free"].max_tunnels == 4


@pytest.mark.parametrize(
    ("env", "url"),
    [
        ({"TP_DATA_DIR": "/srv/tp"}, "sqlite+aiosqlite:////srv/tp/tunnelplane.db"),
        ({"TP_DATABASE_URL": "postgresql+psycopg://db/tp"}, "postgresql+psycopg://db/tp"),
    ],
)
def test_effective_database_url(env: dict[str, str], url: str) -> None:
    assert Settings.from_env(env).effective_database_url == url


def test_every_setting_is_documented_under_its_variable() -> None:
    rows = documented_settings()
    assert len(rows) == len(dataclasses.fields(Settings))
    for variable, _default, doc in rows:
        assert variable.startswith("TP_")
        assert doc
    defaults = {variable: default for variable, default, _doc in rows}
    assert defaults["TP_GRPC_PORT"] == "50051"


def test_a_misspelt_tier_setting_is_refused() -> None:
    with pytest.raises(SettingsError, match="TP_TIER_GOLD_MAX_TUNNELS"):
        Settings.from_env({"TP_TIER_GOLD_MAX_TUNNELS": "3"})
