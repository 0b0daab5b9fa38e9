"""What a tunnel's status says, whatever happened to it.

Laws of ``server.domain.tunnels.rules``: a tunnel that is not carrying traffic says why (every
move into ``disconnected`` or ``error`` leaves a reason), a tunnel that is started or
connected has no stale reason, and a tunnel's health is ``unknown`` until it is started
and an agent has connected, whatever its endpoints say.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from server.domain.common.errors import FailedPrecondition
from server.domain.tunnels.model import (
    EndpointHealth,
    Status,
    Transition,
    TunnelHealth,
    TunnelState,
)
from server.domain.tunnels.rules import health_of, transition

operations = st.lists(
    st.tuples(st.sampled_from(Transition), st.integers(0, 3), st.sampled_from(["", "why"])),
    max_size=30,
)
endpoint_health = st.lists(st.sampled_from(EndpointHealth), max_size=4)


@settings(max_examples=500)
@given(operations)
def test_a_tunnel_not_carrying_says_why_and_a_carrying_one_has_no_stale_reason(
    ops: list[tuple[Transition, int, str]],
) -> None:
    status = Status(TunnelState.CREATED, running=False)
    for event, agents, reason in ops:
        try:
            after = transition(status, event, agents=agents, reason=reason)
        except FailedPrecondition:
            continue
        moved = after.state is not status.state
        if moved and after.state in {TunnelState.DISCONNECTED, TunnelState.ERROR}:
            assert after.reason, (status, event)
            assert after.reason == reason or not reason  # the caller's reason, if it gave one
        if after.state in {TunnelState.CONNECTING, TunnelState.CONNECTED}:
            assert after.reason == ""
        status = after


@given(running=st.booleans(), endpoints=endpoint_health)
def test_health_is_unknown_until_started_and_an_agent_connected(
    endpoints: list[EndpointHealth], *, running: bool
) -> None:
    assert health_of(running, 0, 0, endpoints) is TunnelHealth.UNKNOWN
    assert (
        health_of(running=False, connected=2, lost=1, endpoints=endpoints) is TunnelHealth.UNKNOWN
    )


@given(connected=st.integers(1, 5), lost=st.integers(0, 5), endpoints=endpoint_health)
def test_with_an_agent_health_follows_agents_and_endpoints(
    connected: int, lost: int, endpoints: list[EndpointHealth]
) -> None:
    health = health_of(running=True, connected=connected, lost=lost, endpoints=endpoints)
    if endpoints and all(h is EndpointHealth.UNHEALTHY for h in endpoints):
        assert health is TunnelHealth.DOWN
    elif lost or EndpointHealth.UNHEALTHY in endpoints:
        assert health is TunnelHealth.DEGRADED
    assert (
        health_of(running=True, connected=0, lost=max(lost, 1), endpoints=endpoints)
        is TunnelHealth.DOWN
    )
