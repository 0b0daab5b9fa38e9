"""The proxies' pure rules: the state machine, health counting and restarts
(server/domain/proxies/lifecycle.py), config bounds and the autoscaler
(server/domain/proxies/config.py), the API's reading of a config (server/api/proxy_convert.py)
and the instance's own parts: streaming gzip and the token bucket (proxy/encoding.py,
proxy/limits.py)."""

from __future__ import annotations

import math
import zlib
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.encoding import accepts_gzip, gzip_for
from proxy.limits import Admission, TokenBucket
from server.api import proxy_convert as pc
from server.domain.common.errors import InvalidArgument, Violations
from server.domain.proxies import config as configs
from server.domain.proxies import lifecycle
from server.domain.proxies.insight import Traffic, merged, percentile
from server.domain.proxies.model import (
    Instance,
    InstanceHealth,
    Proxy,
    ProxyConfig,
    ProxyState,
    ScalingEvent,
    ScalingPolicy,
    ScalingTrigger,
    Transition,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
H = InstanceHealth


def instance(health: InstanceHealth = H.UNKNOWN, **fields: object) -> Instance:
    return replace(Instance("p-0", "http://x", "x:1", "http://x:2", health=health), **fields)  # type: ignore[arg-type]


def proxy(state: ProxyState, *instances: Instance, desired: int = 1, **fields: object) -> Proxy:
    made = Proxy(
        id="prx_01jd3k0000000000000000000a",
        user_id="usr_01jd3k0000000000000000000a",
        display_name="p",
        state=state,
        state_reason="",
        config=ProxyConfig(),
        config_version=1,
        desired_instances=desired,
        instances=instances,
        version=1,
        create_time=NOW,
        update_time=NOW,
        state_time=NOW,
        last_active_time=NOW,
    )
    return replace(made, **fields)  # type: ignore[arg-type]


# --- the state machine -------------------------------------------------------------------


@given(st.lists(st.sampled_from(list(Transition)), max_size=30))
def test_any_sequence_of_transitions_moves_only_along_legal_edges(moves: list[Transition]) -> None:
    state = ProxyState.PROVISIONING
    for transition in moves:
        target = lifecycle.move(state, transition)
        if target is None:
            continue
        assert (state, target) in lifecycle.LEGAL
        assert state not in {ProxyState.STOPPED, ProxyState.FAILED}, "final states are final"
        state = target


def test_the_documented_paths() -> None:
    m = lifecycle.move
    assert m(ProxyState.PROVISIONING, Transition.READY) is ProxyState.RUNNING
    assert m(ProxyState.RUNNING, Transition.DEGRADE) is ProxyState.DEGRADED
    assert m(ProxyState.DEGRADED, Transition.READY) is ProxyState.RUNNING
    assert m(ProxyState.RUNNING, Transition.STOP) is ProxyState.STOPPING
    assert m(ProxyState.STOPPING, Transition.STOPPED) is ProxyState.STOPPED
    assert m(ProxyState.STOPPING, Transition.FAIL) is ProxyState.FAILED
    assert m(ProxyState.STOPPED, Transition.FAIL) is None
    assert m(ProxyState.PROVISIONING, Transition.STOPPED) is None  # only through stopping


# --- health ------------------------------------------------------------------------------


def test_three_failed_checks_make_an_instance_unhealthy_and_two_good_ones_healthy() -> None:
    i = instance(H.HEALTHY)
    for n in range(1, 4):
        i = lifecycle.checked(i, NOW, ok=False, error="refused")
        assert i.health is (H.UNHEALTHY if n == 3 else H.HEALTHY)
    assert i.last_error == "refused"
    i = lifecycle.checked(i, NOW, ok=True)
    assert i.health is H.UNHEALTHY
    i = lifecycle.checked(i, NOW, ok=True)
    assert i.health is H.HEALTHY
    assert i.failures == 0
    assert i.last_error == ""


def test_an_instance_that_says_it_is_degraded_is_degraded_once_decided() -> None:
    i = instance()
    i = lifecycle.checked(i, NOW, ok=True, degraded=True)
    assert i.health is H.UNKNOWN
    i = lifecycle.checked(i, NOW, ok=True, degraded=True)
    assert i.health is H.DEGRADED


def test_restarts_back_off_and_a_healthy_spell_resets_them() -> None:
    bad = instance(H.UNHEALTHY, start_time=NOW, restarts=3)
    assert lifecycle.backoff(3) == 8.0
    assert not lifecycle.restart_due(bad, NOW + timedelta(seconds=7))
    assert lifecycle.restart_due(bad, NOW + timedelta(seconds=8))
    assert lifecycle.backoff(30) == lifecycle.MAX_BACKOFF
    assert not lifecycle.restart_due(instance(H.HEALTHY, start_time=NOW), NOW + timedelta(hours=1))
    healed = lifecycle.checked(lifecycle.checked(bad, NOW, ok=True), NOW, ok=True)
    assert healed.restarts == 0


def test_settle_follows_the_instances() -> None:
    healthy, new, sick = instance(H.HEALTHY), instance(), instance(H.UNHEALTHY)
    s = lifecycle.settle
    assert s(proxy(ProxyState.PROVISIONING, healthy), NOW) == (Transition.READY, "")
    assert s(proxy(ProxyState.PROVISIONING, new), NOW) is None
    late = NOW + lifecycle.PROVISIONING_DEADLINE + timedelta(seconds=1)
    assert s(proxy(ProxyState.PROVISIONING, new), late)[0] is Transition.FAIL  # type: ignore[index]
    assert s(proxy(ProxyState.RUNNING, healthy, sick, desired=2), NOW)[0] is Transition.DEGRADE  # type: ignore[index]
    assert s(proxy(ProxyState.RUNNING, healthy, desired=2), NOW)[0] is Transition.DEGRADE  # type: ignore[index]
    # A scale-up's instance still coming up degrades nothing.
    assert s(proxy(ProxyState.RUNNING, healthy, new, desired=2), NOW) is None
    assert s(proxy(ProxyState.DEGRADED, healthy, healthy, desired=2), NOW) == (Transition.READY, "")
    worn = instance(H.UNHEALTHY, restarts=lifecycle.MAX_RESTARTS)
    assert s(proxy(ProxyState.RUNNING, worn), NOW)[0] is Transition.FAIL  # type: ignore[index]
    assert s(proxy(ProxyState.STOPPING, sick), NOW) is None


def test_idle_counts_from_the_last_request() -> None:
    p = proxy(ProxyState.RUNNING, config=ProxyConfig(idle_stop=600))
    assert not lifecycle.idle(p, NOW + timedelta(seconds=599))
    assert lifecycle.idle(p, NOW + timedelta(seconds=600))
    assert not lifecycle.idle(replace(p, config=ProxyConfig(idle_stop=0)), NOW + timedelta(days=9))
    assert not lifecycle.idle(replace(p, state=ProxyState.STOPPING), NOW + timedelta(days=9))


def test_events_of_a_change() -> None:
    before = proxy(ProxyState.DEGRADED)
    kinds = [
        k for k, _ in lifecycle.change_events(before, replace(before, state=ProxyState.RUNNING))
    ]
    assert kinds == ["proxy.recovered"]
    after = replace(before, state=ProxyState.FAILED, config_version=2, desired_instances=3)
    kinds = [k for k, _ in lifecycle.change_events(before, after)]
    assert kinds == ["proxy.failed", "proxy.config_changed"]  # a failed proxy is not scaled
    grown = replace(before, desired_instances=2)
    assert [k for k, _ in lifecycle.change_events(before, grown)] == ["proxy.scaled"]


# --- config ------------------------------------------------------------------------------


def violations_of(config: ProxyConfig) -> set[str]:
    found = Violations()
    configs.validate(config, found)
    try:
        found.raise_if_any()
    except InvalidArgument as error:
        return {v.field for v in error.violations}
    return set()


def test_the_defaults_are_domain_md_and_valid() -> None:
    c = ProxyConfig()
    assert (c.max_connections, c.timeout, c.gzip_level) == (100, 30.0, 6)
    assert (c.rate_limit_rps, c.rate_limit_burst, c.retries, c.retry_delay) == (1000, 100, 3, 1.0)
    assert (c.health_check_interval, c.health_check_timeout, c.idle_stop) == (30.0, 5.0, 600.0)
    p = c.scaling
    assert (p.min_instances, p.max_instances, p.target_cpu, p.scale_up_cpu, p.scale_down_cpu) == (
        1, 10, 70, 80, 30,
    )  # fmt: skip
    assert (p.cooldown_up, p.cooldown_down) == (60.0, 300.0)
    assert violations_of(c) == set()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"max_connections": 0}, "proxy.config.max_connections"),
        ({"timeout": 0.5}, "proxy.config.timeout"),
        ({"timeout": float("nan")}, "proxy.config.timeout"),
        ({"gzip_level": 10}, "proxy.config.gzip_level"),
        ({"max_body_bytes": 1}, "proxy.config.max_body_bytes"),
        ({"health_check_timeout": 30.0}, "proxy.config.health_check_timeout"),
        ({"idle_stop": 10.0}, "proxy.config.idle_stop"),
    ],
)
def test_each_bad_setting_is_named(change: dict[str, object], field: str) -> None:
    assert field in violations_of(replace(ProxyConfig(), **change))  # type: ignore[arg-type]


def test_bad_scaling_policies_are_named_by_their_api_names() -> None:
    bad = ScalingPolicy(min_instances=4, max_instances=2, target_cpu=90, cooldown_down=-1)
    found = violations_of(ProxyConfig(scaling=bad))
    assert found == {
        "proxy.config.scaling.max_instances",
        "proxy.config.scaling.target_cpu_percent",
        "proxy.config.scaling.scale_down_cooldown",
    }


# --- the autoscaler ------------------------------------------------------------------------

POLICY = ScalingPolicy()


def applied(from_: int, to: int, at: datetime) -> ScalingEvent:
    return ScalingEvent(
        "pse_x", "prx_x", ScalingTrigger.LOAD, from_, to, applied=True, reason="",
        cpu_percent=90, streams=0, create_time=at,
    )  # fmt: skip


def test_busy_grows_towards_the_target_and_quiet_shrinks_by_one() -> None:
    up = configs.on_load(POLICY, 2, configs.Load(140.0, 10), None, NOW)
    assert up is not None
    assert up.to_instances == 4
    down = configs.on_load(POLICY, 4, configs.Load(10.0, 0), None, NOW)
    assert down is not None
    assert down.to_instances == 3
    assert configs.on_load(POLICY, 2, configs.Load(50.0, 10), None, NOW) is None


def test_streams_count_when_cpu_is_not_measured() -> None:
    grown = configs.on_load(POLICY, 1, configs.Load(-1.0, 1200), None, NOW)
    assert grown is not None
    assert grown.to_instances == 3
    assert configs.on_load(POLICY, 3, configs.Load(-1.0, 0), None, NOW) is None  # no shrink blind


def test_cooldowns_and_bounds() -> None:
    busy, quiet = configs.Load(95.0, 0), configs.Load(5.0, 0)
    recent = applied(1, 2, NOW - timedelta(seconds=30))
    assert configs.on_load(POLICY, 2, busy, recent, NOW) is None
    assert configs.on_load(POLICY, 2, busy, recent, NOW + timedelta(seconds=31)) is not None
    assert configs.on_load(POLICY, 2, quiet, recent, NOW + timedelta(seconds=200)) is None
    assert configs.on_load(POLICY, 2, quiet, recent, NOW + timedelta(seconds=271)) is not None
    assert configs.on_load(POLICY, 10, busy, None, NOW) is None  # at the most already
    assert configs.on_load(POLICY, 1, quiet, None, NOW) is None  # at the fewest already
    narrowed = replace(POLICY, min_instances=3)
    assert configs.on_load(narrowed, 1, quiet, None, NOW).to_instances == 3  # type: ignore[union-attr]


@given(
    st.integers(1, 10),
    st.floats(-1, 400, allow_nan=False),
    st.integers(0, 100_000),
    st.integers(1, 10),
    st.integers(1, 10),
)
def test_decisions_stay_within_the_policy(
    current: int, cpu: float, streams: int, low: int, span: int
) -> None:
    policy = replace(POLICY, min_instances=low, max_instances=min(10, low + span))
    decision = configs.on_load(policy, current, configs.Load(cpu, streams), None, NOW)
    if decision is not None:
        assert policy.min_instances <= decision.to_instances <= policy.max_instances
        assert decision.to_instances != current


# --- the API's reading of a config --------------------------------------------------------


configs_strategy = st.builds(
    ProxyConfig,
    max_connections=st.integers(1, 10_000),
    timeout=st.integers(1, 3600).map(float),
    gzip_level=st.integers(0, 9),
    retries=st.integers(0, 10),
    idle_stop=st.one_of(st.just(0.0), st.integers(60, 86_400).map(float)),
    scaling=st.builds(ScalingPolicy, min_instances=st.integers(1, 10), dry_run=st.booleans()),
)


@given(configs_strategy)
def test_a_config_reads_back_as_it_was_written(config: ProxyConfig) -> None:
    """Off (0) goes out as -1 (or never_idle_stop) and comes back as off; nothing else moves."""
    assert pc.config_of(pc.config(config)) == config


def test_unset_settings_take_the_defaults() -> None:
    assert pc.config_of(pc.X.ProxyConfig()) == ProxyConfig()


# --- the instance's gzip and limits --------------------------------------------------------


def test_each_gzipped_piece_decodes_at_once() -> None:
    z = gzip_for(6, {"Accept-Encoding": "br, gzip"}, {"Content-Type": "application/x-ndjson"})
    assert z is not None
    reader = zlib.decompressobj(31)
    for piece in (b'{"token":"a"}\n', b'{"token":"b"}\n'):
        assert reader.decompress(z.piece(piece)) == piece  # nothing held back
    assert reader.decompress(z.finish()) == b""
    assert reader.eof


@pytest.mark.parametrize(
    ("accept", "headers", "wanted"),
    [
        ("gzip", {"Content-Type": "text/event-stream"}, True),
        ("gzip;q=0", {"Content-Type": "text/plain"}, False),
        ("identity", {"Content-Type": "text/plain"}, False),
        ("*", {"Content-Type": "application/json"}, True),
        ("gzip", {"Content-Type": "image/png"}, False),
        ("gzip", {"Content-Type": "text/plain", "Content-Encoding": "br"}, False),
        ("gzip", {"Content-Type": "text/plain", "Cache-Control": "no-transform"}, False),
    ],
)
def test_what_is_gzipped(accept: str, headers: dict[str, str], wanted: bool) -> None:
    assert (gzip_for(6, {"Accept-Encoding": accept}, headers) is not None) is wanted
    assert gzip_for(0, {"Accept-Encoding": accept}, headers) is None


def test_accepts_gzip_reads_q_values() -> None:
    assert accepts_gzip("deflate, gzip;q=0.5")
    assert not accepts_gzip("gzip;q=x")


def test_the_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(10.0, 2, clock=lambda: now[0])
    assert bucket.take() == 0.0
    assert bucket.take() == 0.0
    assert bucket.take() == pytest.approx(0.1)
    now[0] = 0.1
    assert bucket.take() == 0.0


def test_admission_limits_connections_then_rate() -> None:
    admission = Admission(max_connections=1, rate=0, burst=0)
    assert admission.refusal() is None
    assert admission.refusal() == (503, "TOO_MANY_CONNECTIONS", 1.0)
    admission.done()
    assert admission.refusal() is None


# --- traffic added up --------------------------------------------------------------------


def traffic_of(requests: int, slow: int) -> Traffic:
    """``requests`` answered, ``slow`` of them in the 1-2.5 s bucket, the rest under 10 ms."""
    fast = requests - slow
    buckets = ((0.01, fast), (1.0, fast), (2.5, requests), (math.inf, requests))
    return Traffic({"2xx": fast, "5xx": slow}, {"UPSTREAM_TIMEOUT": slow}, 10, 20, 1,
                   buckets, buckets)  # fmt: skip


def test_traffic_adds_up_bucket_by_bucket() -> None:
    total = merged([traffic_of(10, 1), traffic_of(10, 9)])
    assert total.requests == 20
    assert dict(total.requests_by_class) == {"2xx": 10, "5xx": 10}
    assert dict(total.errors_by_cause) == {"UPSTREAM_TIMEOUT": 10}
    assert (total.bytes_in, total.bytes_out, total.active) == (20, 40, 2)
    assert percentile(total.duration, 0.5) == 0.01
    assert percentile(total.duration, 0.95) == 2.5
    assert percentile((), 0.5) == 0.0
    assert percentile(((1.0, 0.0), (math.inf, 3.0)), 0.5) == 1.0  # beyond every bound


def test_an_instances_stats_read_back() -> None:
    stats = {
        "requests_by_class": {"2xx": 3},
        "errors_by_cause": {},
        "bytes_in": 1,
        "bytes_out": 2,
        "active": 0,
        "first_byte": [[0.5, 3], [-1, 3]],
        "duration": [[0.5, 3], [-1, 3]],
    }
    read = Traffic.from_json(stats)
    assert read.requests == 3
    assert read.first_byte == ((0.5, 3.0), (math.inf, 3.0))
    with pytest.raises(ValueError, match="unreadable"):
        Traffic.from_json({"requests_by_class": {}})
