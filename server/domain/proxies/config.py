"""A proxy's config: the bounds of each setting, and when to grow or shrink. Pure.

Violations name the request's fields (``proxy.config.timeout``), so a caller learns every
bad value at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from server.domain.common.errors import Violations
from server.domain.proxies.model import ProxyConfig, ScalingEvent, ScalingPolicy, ScalingTrigger

FIELD = "proxy.config"
KIB, GIB = 1024, 1024**3
#: (low, high) of each bounded numeric setting; durations in seconds.
BOUNDS: dict[str, tuple[float, float]] = {
    "max_connections": (1, 10_000),
    "timeout": (1, 3600),
    "first_byte_timeout": (1, 3600),
    "gzip_level": (0, 9),
    "rate_limit_rps": (1, 100_000),
    "rate_limit_burst": (1, 100_000),
    "retries": (0, 10),
    "retry_delay": (0.01, 10),
    "max_body_bytes": (KIB, 10 * GIB),
    "health_check_interval": (1, 600),
    "health_check_timeout": (0.1, 60),
}
SCALING_BOUNDS: dict[str, tuple[float, float]] = {
    "min_instances": (1, 10),
    "max_instances": (1, 10),
    "target_cpu": (1, 100),
    "scale_up_cpu": (1, 100),
    "scale_down_cpu": (0, 99),
    "max_streams_per_instance": (1, 100_000),
    "cooldown_up": (0, 3600),
    "cooldown_down": (0, 3600),
}
#: The request's names where they differ from the record's.
WIRE_NAMES = {
    "target_cpu": "target_cpu_percent",
    "scale_up_cpu": "scale_up_cpu_percent",
    "scale_down_cpu": "scale_down_cpu_percent",
    "cooldown_up": "scale_up_cooldown",
    "cooldown_down": "scale_down_cooldown",
}
IDLE_STOP = (60.0, 30 * 86400.0)


def validate(config: ProxyConfig, violations: Violations) -> None:
    """Add a violation for each setting out of bounds, or in conflict with another."""
    _bounded(config, BOUNDS, FIELD, violations)
    if config.health_check_timeout >= config.health_check_interval:
        violations.add(f"{FIELD}.health_check_timeout", "must be less than the check period")
    if config.idle_stop and not IDLE_STOP[0] <= config.idle_stop <= IDLE_STOP[1]:
        violations.add(f"{FIELD}.idle_stop", "must be 1 min to 30 days (or never)")
    policy, field = config.scaling, f"{FIELD}.scaling"
    _bounded(policy, SCALING_BOUNDS, field, violations)
    if policy.max_instances < policy.min_instances:
        violations.add(f"{field}.max_instances", "must be at least min_instances")
    if not policy.scale_down_cpu < policy.target_cpu < policy.scale_up_cpu:
        violations.add(
            f"{field}.target_cpu_percent",
            "must be above scale_down_cpu_percent and below scale_up_cpu_percent",
        )


def _bounded(
    record: object, bounds: dict[str, tuple[float, float]], prefix: str, violations: Violations
) -> None:
    for name, (low, high) in bounds.items():
        value = getattr(record, name)
        if not (low <= value <= high) or (isinstance(value, float) and math.isnan(value)):
            wire = WIRE_NAMES.get(name, name)
            violations.add(f"{prefix}.{wire}", f"must be {_num(low)} to {_num(high)}")


def _num(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)


# --- scaling -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Load:
    """What the instances said when last asked."""

    cpu_percent: float  # the average over the instances; -1: not measured
    streams: int  # in-flight streams over the instances


@dataclass(frozen=True, slots=True)
class Decision:
    """A scaling decision before it is recorded."""

    to_instances: int
    reason: str


def clamp(policy: ScalingPolicy, instances: int) -> int:
    """``instances`` within the policy's bounds."""
    return max(policy.min_instances, min(policy.max_instances, instances))


def on_load(
    policy: ScalingPolicy,
    current: int,
    load: Load,
    last: ScalingEvent | None,
    now: datetime,
) -> Decision | None:
    """What the autoscaler decides for a proxy with ``current`` instances under ``load``,
    after the last applied decision ``last``; None to leave it."""
    bounded = clamp(policy, current)
    if bounded != current:
        return Decision(
            bounded, f"outside the policy's {policy.min_instances}-{policy.max_instances} instances"
        )
    streams_each = load.streams / max(current, 1)
    busy = load.cpu_percent > policy.scale_up_cpu or streams_each > policy.max_streams_per_instance
    if busy:
        wanted = max(current + 1, _by_cpu(policy, current, load), _by_streams(policy, load))
        target = clamp(policy, wanted)
        if target > current and _cooled(last, now, policy.cooldown_up):
            return Decision(target, _why(load, policy.scale_up_cpu, current, "above"))
        return None
    quiet = streams_each < policy.max_streams_per_instance * 0.3
    shrink = 0 <= load.cpu_percent < policy.scale_down_cpu and quiet
    if shrink and current > policy.min_instances and _cooled(last, now, policy.cooldown_down):
        return Decision(current - 1, _why(load, policy.scale_down_cpu, current, "below"))
    return None


def _by_cpu(policy: ScalingPolicy, current: int, load: Load) -> int:
    if load.cpu_percent <= 0:
        return current
    return math.ceil(current * load.cpu_percent / policy.target_cpu)


def _by_streams(policy: ScalingPolicy, load: Load) -> int:
    return math.ceil(load.streams / policy.max_streams_per_instance)


def _cooled(last: ScalingEvent | None, now: datetime, cooldown: float) -> bool:
    """Whether ``cooldown`` has passed since the last applied decision, either way (a
    shrink right after a growth, or the reverse, would flap)."""
    if last is None or not last.applied:
        return True
    return (now - last.create_time).total_seconds() >= cooldown


def _why(load: Load, threshold: int, current: int, side: str) -> str:
    cpu = "not measured" if load.cpu_percent < 0 else f"{load.cpu_percent:.0f} %"
    return (
        f"CPU {cpu} ({side} the {threshold} % threshold), "
        f"{load.streams} streams over {current} instances"
    )


__all__ = ["Decision", "Load", "ScalingTrigger", "clamp", "on_load", "validate"]
