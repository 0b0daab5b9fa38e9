"""Property 8: proxy state consistency.

For any sequence of operations on a proxy — its owner's (stop, scale, config changes and
rollbacks) and the fleet loop's (instances placed, checks passing or failing, the
provisioner giving up, the instances gone) — the proxy only moves along the legal edges,
and every accepted change is stored with its event, in order: each move of state with
its own event (from, to), each config revision with ``proxy.config_changed`` (the
revisions numbered 1, 2, ... without a gap, the current one the stored config), each new
instance count with ``proxy.scaled``. Through the real service and storage, on both
databases.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import grpc
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from server.app import App
from server.domain.common.errors import DomainError
from server.domain.proxies.fleet import ProxyDraft
from server.domain.proxies.lifecycle import LEGAL
from server.domain.proxies.model import Instance, ProxyConfig
from server.domain.proxies.upkeep import Check
from tests.helpers import Client, TestUser

MAX_EXAMPLES = 30
STATE_EVENTS = {"proxy.state_changed", "proxy.recovered", "proxy.failed", "proxy.stopped"}

#: The fleet loop's operations come more often than the owner's: a proxy has to come up
#: and go through its health states before stopping ends the story.
loop_operations = st.one_of(
    st.tuples(st.just("place"), st.integers(0, 4)),
    st.tuples(st.just("check"), st.sampled_from(["ok", "fail", "degraded", "mixed"])),
)
operations = st.lists(
    st.one_of(
        loop_operations,
        loop_operations,
        loop_operations,
        st.tuples(st.just("stop")),
        st.tuples(st.just("scale"), st.integers(1, 4), st.booleans()),
        st.tuples(st.just("config"), st.integers(1, 120)),
        st.tuples(st.just("rollback"), st.integers(1, 4)),
        st.tuples(st.just("place"), st.integers(0, 4)),
        st.tuples(st.just("check"), st.sampled_from(["ok", "fail", "degraded", "mixed"])),
        st.tuples(st.just("fail")),
        st.tuples(st.just("gone")),
    ),
    max_size=25,
)


@dataclass
class Fixture:
    client: Client
    owner: TestUser


@pytest_asyncio.fixture(scope="module")
async def owner(app: App, channel: grpc.aio.Channel) -> Fixture:
    client = Client(app, channel)
    return Fixture(client, await client.new_user(tag="proxy-machine"))


@pytest.fixture
def examples() -> Iterator[list[object]]:
    seen: list[object] = []
    yield seen
    assert len(seen) >= MAX_EXAMPLES, f"only {len(seen)} examples ran"


def placements(proxy_id: str, count: int) -> list[Instance]:
    return [
        Instance(f"{proxy_id}-{n}", f"http://127.0.0.1:{9000 + n}", f"127.0.0.1:{9100 + n}",
                 f"http://127.0.0.1:{9200 + n}")
        for n in range(count)
    ]  # fmt: skip


def checks(instances: tuple[Instance, ...], kind: str) -> dict[str, Check]:
    out = {}
    for n, i in enumerate(instances):
        ok = kind in {"ok", "degraded"} or (kind == "mixed" and n % 2 == 0)
        out[i.id] = Check(ok=ok, degraded=kind == "degraded", error="" if ok else "refused")
    return out


async def apply(app: App, owner_id: str, proxy_id: str, op: tuple[Any, ...]) -> None:
    fleet, upkeep = app.proxies.fleet, app.proxies.upkeep
    current = await fleet.get(owner_id, proxy_id)
    kind = op[0]
    if kind == "stop":
        await fleet.stop(owner_id, proxy_id, actor="")
    elif kind == "scale":
        await fleet.scale(owner_id, proxy_id, op[1], validate_only=op[2], actor="")
    elif kind == "config":
        config = replace(current.config, timeout=float(op[1]))
        paths = ("config.timeout",)
        await fleet.update(owner_id, proxy_id, ProxyDraft("", config), paths, etag="", actor="")
    elif kind == "rollback":
        await fleet.rollback(owner_id, proxy_id, op[1], etag="", actor="")
    elif kind == "place":
        await upkeep.placed(proxy_id, placements(proxy_id, op[1]))
    elif kind == "check":
        for _ in range(3):  # enough in a row to decide the health either way
            await upkeep.checked(proxy_id, checks(current.instances, op[1]))
    elif kind == "fail":
        await upkeep.failed(proxy_id, "the provisioner gave up")
    else:
        await upkeep.stopped(proxy_id)


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@example(  # the whole life: up, degraded, recovered, grown, reconfigured, rolled back
    ops=[("place", 2), ("check", "ok"), ("check", "mixed"), ("check", "ok"), ("scale", 3, False),
         ("place", 3), ("config", 9), ("rollback", 1), ("check", "fail"), ("stop",)]
)  # fmt: skip
@given(ops=operations)
async def test_every_accepted_change_is_stored_with_its_events_in_order(
    app: App, owner: Fixture, examples: list[object], ops: list[tuple[Any, ...]]
) -> None:
    examples.append(ops)
    owner_id = owner.owner.id
    started = await app.proxies.fleet.start(
        owner_id, ProxyDraft("machine", ProxyConfig()), request_id="", actor=""
    )
    expected: list[tuple[str, Any, Any]] = []
    before = started
    for op in ops:
        # Some are refused (a stopped proxy's config, a rollback to a missing revision...).
        with contextlib.suppress(DomainError):
            await apply(app, owner_id, started.id, op)
        after = await app.proxies.fleet.get(owner_id, started.id)
        if after.state is not before.state:
            assert (before.state, after.state) in LEGAL, op
            expected.append(("state", before.state.value, after.state.value))
        if after.config_version != before.config_version:
            assert after.config_version == before.config_version + 1, op
            expected.append(("config", before.config_version, after.config_version))
        if after.desired_instances != before.desired_instances and after.active:
            expected.append(("scaled", before.desired_instances, after.desired_instances))
        before = after
    await app.proxies.fleet.stop(owner_id, started.id, actor="")  # frees the quota
    final = await app.proxies.fleet.get(owner_id, started.id)
    if final.state is not before.state:
        expected.append(("state", before.state.value, final.state.value))
    await app.proxies.upkeep.stopped(started.id)
    ended = await app.proxies.fleet.get(owner_id, started.id)
    if ended.state is not final.state:
        expected.append(("state", final.state.value, ended.state.value))
    assert await recorded(app, owner_id, started.name) == expected
    await revisions_are_whole(app, owner_id, ended)


async def recorded(app: App, user_id: str, name: str) -> list[tuple[str, Any, Any]]:
    """The proxy's events after ``proxy.started``, oldest first, as (kind, from, to)."""
    items = []
    token = ""
    while True:
        page = await app.events.log.list(
            user_id, page_size=1000, page_token=token, filter=f'subject = "{name}"'
        )
        items += page.items
        token = page.next_page_token
        if not token:
            break
    found: list[tuple[str, Any, Any]] = []
    for e in reversed(items):
        p = e.payload
        if e.type in STATE_EVENTS:
            found.append(("state", p["from"], p["to"]))
        elif e.type == "proxy.config_changed":
            found.append(("config", p["from_version"], p["to_version"]))
        elif e.type == "proxy.scaled":
            found.append(("scaled", p["from"], p["to"]))
        else:
            assert e.type in {"proxy.started", "proxy.instance_restarted"}, e.type
    return found


async def revisions_are_whole(app: App, owner_id: str, proxy: Any) -> None:
    page = await app.proxies.fleet.revisions(owner_id, proxy.id, page_size=1000, page_token="")
    versions = sorted(r.version for r in page.items)
    assert versions == list(range(1, proxy.config_version + 1))
    newest = max(page.items, key=lambda r: r.version)
    assert newest.config == proxy.config
