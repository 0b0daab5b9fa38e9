"""Laws of endpoint health and endpoint choice (server/domain/tunnels/endpoints.py).

- Health never changes before a full run of ``healthy_after`` good or ``unhealthy_after``
  bad probes, and always changes when one completes.
- The chosen endpoint is a healthy one of the best priority that has one.
- Taking away an endpoint that was not chosen never changes the choice.
- Over many tunnels, each endpoint gets a share of them proportional to its weight.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from server.domain.tunnels.endpoints import (
    EndpointStatus,
    ProbeThresholds,
    apply_probe,
    choose_active,
    next_best,
)
from server.domain.tunnels.model import EndpointHealth, EndpointSpec

Endpoints = list[tuple[EndpointSpec, EndpointHealth]]

thresholds = st.builds(
    ProbeThresholds, unhealthy_after=st.integers(1, 6), healthy_after=st.integers(1, 6)
)
healths = st.sampled_from(list(EndpointHealth))
keys = st.text(min_size=1, max_size=30)


@st.composite
def endpoint_lists(draw: st.DrawFn, min_size: int = 0) -> Endpoints:
    """Up to 10 endpoints with distinct URLs, a few priorities, weights and healths."""
    size = draw(st.integers(min_size, 10))
    return [
        (
            EndpointSpec(
                f"http://e{i}.example",
                draw(st.integers(0, 3)),
                draw(st.integers(1, 1000)),
            ),
            draw(healths),
        )
        for i in range(size)
    ]


def trailing(results: list[bool], value: bool) -> int:
    """How many of the last results equal ``value`` in a row."""
    run = 0
    for result in reversed(results):
        if result is not value:
            break
        run += 1
    return run


@settings(max_examples=300)
@given(limits=thresholds, start=healths, results=st.lists(st.booleans(), max_size=40))
def test_health_flips_exactly_when_a_threshold_is_reached(
    limits: ProbeThresholds, start: EndpointHealth, results: list[bool]
) -> None:
    status = EndpointStatus(health=start)
    for i, ok in enumerate(results):
        before = status.health
        status = apply_probe(status, ok, "" if ok else "refused", float(i), limits)
        seen = results[: i + 1]
        if ok and trailing(seen, value=True) >= limits.healthy_after:
            assert status.health is EndpointHealth.HEALTHY
        elif not ok and trailing(seen, value=False) >= limits.unhealthy_after:
            assert status.health is EndpointHealth.UNHEALTHY
        else:
            assert status.health is before, (seen, limits)
        assert (status.successes, status.failures) == (
            (trailing(seen, value=True), 0) if ok else (0, trailing(seen, value=False))
        )


def best_healthy(endpoints: Endpoints) -> set[EndpointSpec]:
    """The healthy endpoints of the best priority that has one."""
    healthy = [spec for spec, health in endpoints if health is EndpointHealth.HEALTHY]
    if not healthy:
        return set()
    best = min(spec.priority for spec in healthy)
    return {spec for spec in healthy if spec.priority == best}


@settings(max_examples=300)
@given(endpoints=endpoint_lists(), key=keys)
def test_the_choice_is_a_healthy_endpoint_of_the_best_priority(
    endpoints: Endpoints, key: str
) -> None:
    chosen = choose_active(endpoints, key)
    allowed = best_healthy(endpoints)
    if allowed:
        assert chosen in allowed
    elif any(health is EndpointHealth.UNKNOWN for _, health in endpoints):
        assert chosen is not None
        assert dict(endpoints)[chosen] is EndpointHealth.UNKNOWN
    else:
        assert chosen is None


@settings(max_examples=300)
@given(endpoints=endpoint_lists(min_size=1), key=keys, data=st.data())
def test_removing_an_endpoint_that_was_not_chosen_changes_nothing(
    endpoints: Endpoints, key: str, data: st.DataObject
) -> None:
    chosen = choose_active(endpoints, key)
    removed = data.draw(st.sampled_from(endpoints))[0]
    if removed == chosen:
        return
    assert next_best(endpoints, key, removed.url) == chosen
    assert choose_active([e for e in endpoints if e[0] != removed], key) == chosen


@settings(max_examples=300)
@given(endpoints=endpoint_lists(min_size=1), key=keys)
def test_failover_never_returns_the_current_endpoint(endpoints: Endpoints, key: str) -> None:
    current = choose_active(endpoints, key)
    if current is not None:
        assert next_best(endpoints, key, current.url) != current


TUNNELS = [f"tun_{i:05d}" for i in range(6000)]


@settings(max_examples=40, deadline=None)
@given(weights=st.lists(st.integers(1, 20), min_size=2, max_size=5))
def test_shares_follow_the_weights(weights: list[int]) -> None:
    specs = [EndpointSpec(f"http://e{i}.example", 0, w) for i, w in enumerate(weights)]
    endpoints = [(spec, EndpointHealth.HEALTHY) for spec in specs]
    counts = Counter(choose_active(endpoints, key) for key in TUNNELS)
    total = sum(weights)
    for spec in specs:
        share = counts[spec] / len(TUNNELS)
        # Expected share w/total; 0.03 is over 4.5 standard deviations at 6000 keys.
        assert abs(share - spec.weight / total) < 0.03, (weights, spec, share)
