"""Proxies between their API form and the domain's.

In a request, an unset (zero) setting takes its default and ``-1`` turns off the settings
that can be off (gzip, retries); the answer shows the values in effect.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any

import orjson
from google.protobuf import duration_pb2
from tunnelplane.v1 import proxies_pb2

from server.api.convert import from_duration, timestamp
from server.api.tunnel_convert import duration
from server.domain.proxies.fleet import ProxyDraft
from server.domain.proxies.insight import (
    Asked,
    Diagnostics,
    InstanceTraffic,
    Traffic,
    percentile,
)
from server.domain.proxies.model import (
    ConfigRevision,
    Instance,
    InstanceHealth,
    Proxy,
    ProxyConfig,
    ProxyState,
    ScalingEvent,
    ScalingPolicy,
    ScalingTrigger,
)

X = proxies_pb2
_P, _I, _E = X.Proxy, X.ProxyInstance, X.ProxyScalingEvent
STATES: Mapping[ProxyState, int] = {
    ProxyState.PROVISIONING: _P.STATE_PROVISIONING,
    ProxyState.RUNNING: _P.STATE_RUNNING,
    ProxyState.DEGRADED: _P.STATE_DEGRADED,
    ProxyState.STOPPING: _P.STATE_STOPPING,
    ProxyState.STOPPED: _P.STATE_STOPPED,
    ProxyState.FAILED: _P.STATE_FAILED,
}
HEALTH: Mapping[InstanceHealth, int] = {
    InstanceHealth.UNKNOWN: _I.HEALTH_UNKNOWN,
    InstanceHealth.HEALTHY: _I.HEALTH_HEALTHY,
    InstanceHealth.DEGRADED: _I.HEALTH_DEGRADED,
    InstanceHealth.UNHEALTHY: _I.HEALTH_UNHEALTHY,
}
TRIGGERS: Mapping[ScalingTrigger, int] = {
    ScalingTrigger.LOAD: _E.TRIGGER_LOAD,
    ScalingTrigger.MANUAL: _E.TRIGGER_MANUAL,
}
#: Settings whose ``-1`` in a request means off (0 in the domain).
OFF_BY_MINUS_ONE = frozenset({"gzip_level", "retries"})
DEFAULTS, POLICY_DEFAULTS = ProxyConfig(), ScalingPolicy()
#: The request's names of the policy's fields.
POLICY_WIRE = {
    "target_cpu": "target_cpu_percent",
    "scale_up_cpu": "scale_up_cpu_percent",
    "scale_down_cpu": "scale_down_cpu_percent",
    "cooldown_up": "scale_up_cooldown",
    "cooldown_down": "scale_down_cooldown",
}


def proxy(p: Proxy) -> X.Proxy:
    """The API form of a proxy."""
    return X.Proxy(
        name=p.name,
        display_name=p.display_name,
        state=STATES[p.state],  # type: ignore[arg-type]
        state_reason=p.state_reason,
        config=config(p.config),
        config_version=p.config_version,
        desired_instances=p.desired_instances,
        instances=[instance(i) for i in p.instances],
        create_time=timestamp(p.create_time),
        update_time=timestamp(p.update_time),
        state_time=timestamp(p.state_time),
        last_active_time=timestamp(p.last_active_time),
        etag=p.etag,
    )


def instance(i: Instance) -> X.ProxyInstance:
    """The API form of an instance (its admin URL stays inside)."""
    return X.ProxyInstance(
        id=i.id,
        health=HEALTH[i.health],  # type: ignore[arg-type]
        public_url=i.public_url,
        link_address=i.link_address,
        restarts=i.restarts,
        start_time=timestamp(i.start_time),
        last_check_time=timestamp(i.last_check_time),
        last_error=i.last_error,
        checks=[
            X.ProxyHealthCheck(time=timestamp(c.time), ok=c.ok, error=c.error) for c in i.checks
        ],
    )


def config(c: ProxyConfig) -> X.ProxyConfig:
    """The API form of a config: the values in effect."""
    out = X.ProxyConfig()
    for f in fields(ProxyConfig):
        value = getattr(c, f.name)
        if f.name == "scaling":
            continue
        if f.name == "idle_stop":
            if value:
                out.idle_stop.CopyFrom(duration(value))
            else:
                out.never_idle_stop = True
        elif isinstance(getattr(out, f.name), duration_pb2.Duration):
            getattr(out, f.name).CopyFrom(duration(value))
        elif f.name in OFF_BY_MINUS_ONE and value == 0:
            setattr(out, f.name, -1)
        else:
            setattr(out, f.name, value)
    for f in fields(ScalingPolicy):
        value = getattr(c.scaling, f.name)
        wire = POLICY_WIRE.get(f.name, f.name)
        if isinstance(getattr(out.scaling, wire), duration_pb2.Duration):
            getattr(out.scaling, wire).CopyFrom(duration(value))
        else:
            setattr(out.scaling, wire, value)
    return out


def config_of(message: X.ProxyConfig, field: str = "proxy.config") -> ProxyConfig:
    """The config a request asks for: unset settings take their defaults."""
    values: dict[str, Any] = {}
    for f in fields(ProxyConfig):
        if f.name in {"scaling", "idle_stop"}:
            continue
        values[f.name] = _value(message, f.name, getattr(DEFAULTS, f.name), field)
    idle = _value(message, "idle_stop", DEFAULTS.idle_stop, field)
    values["idle_stop"] = 0.0 if message.never_idle_stop else idle
    if not message.HasField("health_check_timeout"):  # within a short period, by default
        period = values["health_check_interval"]
        values["health_check_timeout"] = min(DEFAULTS.health_check_timeout, period / 2)
    policy: dict[str, Any] = {}
    for f in fields(ScalingPolicy):
        wire = POLICY_WIRE.get(f.name, f.name)
        default = getattr(POLICY_DEFAULTS, f.name)
        policy[f.name] = _value(message.scaling, wire, default, f"{field}.scaling")
    return ProxyConfig(**values, scaling=ScalingPolicy(**policy))


def _value(message: Any, name: str, default: Any, field: str) -> Any:
    raw = getattr(message, name)
    if isinstance(raw, duration_pb2.Duration):
        if not message.HasField(name):
            return default
        return from_duration(raw, f"{field}.{name}").total_seconds()
    if isinstance(raw, bool):
        return raw
    if raw == 0:
        return default
    if raw == -1 and name in OFF_BY_MINUS_ONE:
        return 0
    return raw


def draft(message: X.Proxy) -> ProxyDraft:
    """The writable part of a proxy from a request."""
    return ProxyDraft(message.display_name, config_of(message.config))


def revision(r: ConfigRevision, proxy_name: str) -> X.ProxyConfigRevision:
    """The API form of a config revision."""
    return X.ProxyConfigRevision(
        name=f"{proxy_name}/configRevisions/{r.version}",
        version=r.version,
        config=config(r.config),
        create_time=timestamp(r.create_time),
        actor=r.actor,
        restored_version=r.rolled_back_from,
    )


def scaling_event(e: ScalingEvent, proxy_name: str) -> X.ProxyScalingEvent:
    """The API form of a scaling decision."""
    return X.ProxyScalingEvent(
        name=f"{proxy_name}/scalingEvents/{e.id}",
        trigger=TRIGGERS[e.trigger],  # type: ignore[arg-type]
        from_instances=e.from_instances,
        to_instances=e.to_instances,
        applied=e.applied,
        reason=e.reason,
        cpu_percent=e.cpu_percent,
        streams=e.streams,
        create_time=timestamp(e.create_time),
        actor=e.actor,
    )


def traffic(t: Traffic, instance: str) -> X.ProxyTraffic:
    """The API form of traffic (``instance`` "" for a total)."""
    return X.ProxyTraffic(
        instance=instance,
        reachable=True,
        requests=t.requests,
        requests_by_class=dict(t.requests_by_class),
        errors_by_cause=dict(t.errors_by_cause),
        bytes_in=t.bytes_in,
        bytes_out=t.bytes_out,
        active_streams=t.active,
        first_byte_p50=duration(percentile(t.first_byte, 0.5)),
        first_byte_p95=duration(percentile(t.first_byte, 0.95)),
        duration_p50=duration(percentile(t.duration, 0.5)),
        duration_p95=duration(percentile(t.duration, 0.95)),
    )


def instance_traffic(t: InstanceTraffic) -> X.ProxyTraffic:
    """One instance's traffic, or why it is not known."""
    if t.traffic is None:
        return X.ProxyTraffic(instance=t.instance.id, reachable=False, error=t.error)
    return traffic(t.traffic, t.instance.id)


def diagnostics(name: str, d: Diagnostics) -> X.ProxyDiagnostics:
    """The API form of the bundle."""
    proxy_name = d.proxy.name
    return X.ProxyDiagnostics(
        name=name,
        proxy=proxy(d.proxy),
        scaling_events=[scaling_event(e, proxy_name) for e in d.scaling_events],
        config_revisions=[revision(r, proxy_name) for r in d.revisions],
        instances=[instance_diagnostics(a) for a in d.instances],
        create_time=timestamp(d.time),
    )


def instance_diagnostics(a: Asked) -> X.ProxyInstanceDiagnostics:
    """What one instance said of itself (what parses of it)."""
    out = X.ProxyInstanceDiagnostics(
        instance=a.instance.id,
        reachable=a.answer is not None,
        error=a.error,
        start_time=timestamp(a.instance.start_time),
    )
    if a.answer is None:
        return out
    data = a.answer
    try:
        out.config_version = int(data.get("config_version", 0))
        out.effective_config = orjson.dumps(data.get("config", {})).decode()[:20_000]
        out.recent_logs.extend(_lines(data.get("recent_logs", ()))[-200:])
        out.recent_errors.extend(_lines(data.get("recent_errors", ()))[-50:])
    except (TypeError, ValueError, OverflowError, orjson.JSONEncodeError):
        out.reachable, out.error = False, "the instance's diagnostics do not parse"
    return out


def _lines(items: Any) -> list[X.ProxyLogLine]:
    return [
        X.ProxyLogLine(
            time=timestamp(datetime.fromtimestamp(float(i["time"]), UTC)),
            level=str(i.get("level", ""))[:20],
            logger=str(i.get("logger", ""))[:100],
            message=str(i.get("message", ""))[:500],
        )
        for i in items
    ]
