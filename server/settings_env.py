"""Reading ``TP_*`` environment variables: each setting's variable name, the kinds of value
a variable may hold, and how each kind is parsed (:mod:`server.settings` holds the fields)."""

from __future__ import annotations

import dataclasses
import ipaddress
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args

from server.domain.identity.model import TierLimits
from server.domain.identity.tiers import DEFAULT_TIERS

Mode = Literal["development", "sandbox", "production"]
OtelExporter = Literal["none", "console", "otlp"]
LogFormat = Literal["json", "text"]
AddressPolicy = Literal["auto", "any", "public"]
Provisioner = Literal["local", "kubernetes", "off"]
CpuAffinity = Literal["off", "auto"]

#: The literal kinds of value, by the name a field's annotation gives them.
CHOICES: Mapping[str, Any] = {
    "Mode": Mode,
    "OtelExporter": OtelExporter,
    "LogFormat": LogFormat,
    "AddressPolicy": AddressPolicy,
    "Provisioner": Provisioner,
    "CpuAffinity": CpuAffinity,
}


class SettingsError(ValueError):
    """A ``TP_*`` variable is missing or does not parse; the message names it."""


def env_name(f: dataclasses.Field[Any]) -> str:
    """The environment variable of a settings field."""
    return str(f.metadata.get("env") or env_name_of(f.name))


def env_name_of(field_name: str) -> str:
    """``grpc_port`` -> ``TP_GRPC_PORT``."""
    return "TP_" + field_name.upper()


def networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Parse a comma-separated CIDR list (a bare address is a /32 or /128)."""
    return tuple(
        ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip()
    )


def read_env(fields: Iterable[dataclasses.Field[Any]], env: Mapping[str, str]) -> dict[str, Any]:
    """The values ``env`` sets for ``fields`` (tiers included), parsed to their types;
    raise :class:`SettingsError` naming a bad variable."""
    values: dict[str, Any] = {}
    for f in fields:
        name = env_name(f)
        if name == "-" or name not in env:
            continue
        values[f.name] = _parse(name, env[name], f.type)
    values["tiers"] = _tiers_from_env(env)
    return values


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
    choices = tuple(get_args(CHOICES[kind]))
    if raw not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}; got {raw!r}")
    return raw


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
