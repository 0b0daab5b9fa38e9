"""Property 6: tunnel state transitions are consistent.

For any sequence of operations (start, stop, agents coming and going, failures), the state
machine never reaches an illegal state: every accepted transition is one of the legal
edges, a refused one changes nothing and names the state; and through the real service
and storage, every accepted state change is recorded with its ``tunnel.status_changed``
event, in order, in the same transaction.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.app import App
from server.domain.common.errors import FailedPrecondition
from server.domain.identity.model import Tier
from server.domain.tunnels.model import Status, Transition, TunnelState
from server.domain.tunnels.rules import LEGAL, transition
from tests.helpers import Client, TestUser

MAX_EXAMPLES = 25
#: An operation: a transition and the number of agents connected when it happens.
operations = st.lists(
    st.tuples(st.sampled_from(Transition), st.integers(min_value=0, max_value=3)), max_size=30
)


def step(status: Status, event: Transition, agents: int) -> Status:
    """The model: the machine's answer, refusals leaving the status as it was."""
    try:
        return transition(status, event, agents=agents)
    except FailedPrecondition as refused:
        assert refused.metadata["state"] == status.state.value
        return status


@settings(max_examples=500)
@given(operations)
def test_any_sequence_stays_on_legal_edges(ops: list[tuple[Transition, int]]) -> None:
    status = Status(TunnelState.CREATED, running=False)
    for event, agents in ops:
        after = step(status, event, agents)
        if after.state is not status.state:
            assert (status.state, after.state) in LEGAL
        if after.state is TunnelState.CREATED:
            assert not after.running  # nothing returns a tunnel to "created"
        if after.state in {TunnelState.CONNECTING, TunnelState.CONNECTED}:
            assert after.running
        status = after


# --- through the service and storage -----------------------------------------------------


@dataclass
class Fixture:
    client: Client
    owner: TestUser


@pytest_asyncio.fixture(scope="module")
async def owner(app: App, channel: grpc.aio.Channel) -> Fixture:
    client = Client(app, channel)
    return Fixture(client, await client.new_user(tier=Tier.ENTERPRISE, tag="machine"))


@pytest.fixture
def examples() -> Iterator[list[object]]:
    seen: list[object] = []
    yield seen
    assert len(seen) >= MAX_EXAMPLES, f"only {len(seen)} examples ran"


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=operations)
async def test_every_accepted_change_is_stored_with_its_event(
    app: App, owner: Fixture, examples: list[object], ops: list[tuple[Transition, int]]
) -> None:
    examples.append(ops)
    tunnels = app.tunnels.tunnels
    made = await owner.client.tunnel(owner.owner)
    tunnel_id = made.name.rsplit("/", 1)[1]
    user_id = owner.owner.id
    model = Status(TunnelState.CREATED, running=False)
    connected = 0  # agents connected, as the service last heard
    expected_events: list[tuple[str, str]] = []
    for event, agents in ops:
        if event is Transition.AGENT_UP:
            connected = max(agents, 1)
        elif event is Transition.AGENT_DOWN:
            connected = 0
        after = step(model, event, connected)
        try:
            if event is Transition.START:
                await tunnels.start(user_id, tunnel_id, Tier.ENTERPRISE, actor="")
            elif event is Transition.STOP:
                await tunnels.stop(user_id, tunnel_id, actor="")
            elif event is Transition.FAIL:
                await tunnels.fail(user_id, tunnel_id, "drill")
            else:
                await tunnels.agents_changed(tunnel_id, connected, 0)
        except FailedPrecondition:
            assert after == model, f"{event} refused, but the model accepts it"
        stored = await tunnels.get(user_id, tunnel_id)
        assert stored.state is after.state, (event, agents)
        assert stored.status.running == after.running
        if after.state is not model.state:
            expected_events.append((model.state.value, after.state.value))
        model = after
    assert await status_events(app, user_id, made.name) == expected_events


async def status_events(app: App, user_id: str, name: str) -> list[tuple[str, str]]:
    """(from, to) of the tunnel's status_changed events, oldest first."""
    found: list[tuple[str, str]] = []
    token = ""
    while True:
        page = await app.events.log.list(
            user_id, page_size=1000, page_token=token, filter=f'subject = "{name}"'
        )
        found += [
            (e.payload["from"], e.payload["to"])
            for e in page.items
            if e.type == "tunnel.status_changed"
        ]
        token = page.next_page_token
        if not token:
            return list(reversed(found))
