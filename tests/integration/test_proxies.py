"""ProxyService's proxy resources against the real server on both backends, over gRPC and
the HTTP gateway: start, read, list, stop; config changes as numbered revisions with
rollback; scaling by hand within the policy (recorded, dry runs included); the per-user
limit, retried starts, etags, and what a stopped proxy refuses. This server runs no fleet
loop (tests/proxy/test_fleet_processes.py runs the instances)."""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx
from google.protobuf import duration_pb2, field_mask_pb2
from tunnelplane.v1 import proxies_pb2

from server.domain.proxies.fleet import ProxyDraft
from server.domain.proxies.model import Instance, Pool, ProxyState
from server.domain.proxies.upkeep import Check
from server.provision.admin import InstanceAdminClient
from server.storage.leader import Leadership
from server.workers.proxy_fleet import ProxyFleetLoop
from tests.conftest import Backend, own_server
from tests.helpers import (
    PASSWORD,
    Client,
    FakeClock,
    TestUser,
    fails,
    reason,
    unique_email,
    violations,
)

X = proxies_pb2
W = X.WatchProxiesResponse
Mask = field_mask_pb2.FieldMask


async def start(client: Client, user: TestUser, **fields: object) -> X.Proxy:
    return await client.proxies.StartProxy(
        X.StartProxyRequest(parent="users/me", proxy=X.Proxy(**fields)), metadata=user.metadata
    )


async def test_a_proxy_starts_with_the_defaults_and_stops(client: Client) -> None:
    user = await client.new_user(tag="proxy")
    made = await start(client, user, display_name="laptop")
    assert made.name.startswith(f"users/{user.id}/proxies/prx_")
    assert (made.state, made.desired_instances, made.config_version) == (
        X.Proxy.STATE_PROVISIONING, 1, 1,
    )  # fmt: skip
    c = made.config
    assert (c.max_connections, c.timeout.seconds, c.gzip_level, c.rate_limit_rps) == (
        100, 30, 6, 1000,
    )  # fmt: skip
    assert (c.idle_stop.seconds, c.scaling.max_instances, c.scaling.target_cpu_percent) == (
        600, 10, 70,
    )  # fmt: skip
    got = await client.proxies.GetProxy(X.GetProxyRequest(name=made.name), metadata=user.metadata)
    assert got == made
    listed = await client.proxies.ListProxies(
        X.ListProxiesRequest(parent="users/me", filter='state = "provisioning"'),
        metadata=user.metadata,
    )
    assert [p.name for p in listed.proxies] == [made.name]
    stopped = await client.proxies.StopProxy(
        X.StopProxyRequest(name=made.name), metadata=user.metadata
    )
    assert (stopped.state, stopped.state_reason) == (
        X.Proxy.STATE_STOPPING, "stopped by the owner",
    )  # fmt: skip
    again = await client.proxies.StopProxy(
        X.StopProxyRequest(name=made.name), metadata=user.metadata
    )
    assert again == stopped  # stopping a stopping proxy changes nothing
    events = await client.app.events.log.list(
        user.id, page_size=10, page_token="", filter=f'subject = "{made.name}"'
    )
    assert [e.type for e in reversed(events.items)] == ["proxy.started", "proxy.state_changed"]


async def test_config_changes_are_revisions_and_roll_back(client: Client) -> None:
    user = await client.new_user(tag="proxy")
    made = await start(client, user)
    changed = await client.proxies.UpdateProxy(
        X.UpdateProxyRequest(
            proxy=X.Proxy(
                name=made.name,
                config=X.ProxyConfig(
                    timeout=duration_pb2.Duration(seconds=90),
                    gzip_level=-1,
                    scaling=X.ProxyScalingPolicy(max_instances=3, dry_run=True),
                ),
            ),
            update_mask=Mask(
                paths=[
                    "config.timeout",
                    "config.gzip_level",
                    "config.scaling.max_instances",
                    "config.scaling.dry_run",
                ]
            ),
        ),
        metadata=user.metadata,
    )
    assert changed.config_version == 2
    assert (changed.config.timeout.seconds, changed.config.gzip_level) == (90, -1)
    assert changed.config.max_connections == 100  # not in the mask: kept
    assert (changed.config.scaling.max_instances, changed.config.scaling.dry_run) == (3, True)
    renamed = await client.proxies.UpdateProxy(
        X.UpdateProxyRequest(
            proxy=X.Proxy(name=made.name, display_name="renamed"),
            update_mask=Mask(paths=["display_name"]),
        ),
        metadata=user.metadata,
    )
    assert (renamed.display_name, renamed.config_version) == ("renamed", 2)  # no new revision
    stale = await fails(
        client.proxies.RollbackProxyConfig(
            X.RollbackProxyConfigRequest(name=made.name, version=1, etag=changed.etag),
            metadata=user.metadata,
        ),
        grpc.StatusCode.ABORTED,
    )
    assert reason(stale) == "ETAG_MISMATCH"
    rolled = await client.proxies.RollbackProxyConfig(
        X.RollbackProxyConfigRequest(name=made.name, version=1, etag=renamed.etag),
        metadata=user.metadata,
    )
    assert rolled.config_version == 3
    assert rolled.config == made.config
    revisions = await client.proxies.ListProxyConfigRevisions(
        X.ListProxyConfigRevisionsRequest(parent=made.name), metadata=user.metadata
    )
    assert [(r.version, r.restored_version) for r in revisions.revisions] == [
        (3, 1), (2, 0), (1, 0),
    ]  # fmt: skip
    assert revisions.revisions[0].name == f"{made.name}/configRevisions/3"
    assert revisions.revisions[1].actor == f"users/{user.id}"
    missing = await fails(
        client.proxies.RollbackProxyConfig(
            X.RollbackProxyConfigRequest(name=made.name, version=9), metadata=user.metadata
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert "configRevisions/9" in (missing.details() or "")


async def test_scaling_by_hand_is_bounded_and_recorded(client: Client) -> None:
    user = await client.new_user(tag="proxy")
    made = await start(client, user, config=X.ProxyConfig(
        scaling=X.ProxyScalingPolicy(max_instances=3)))  # fmt: skip
    over = await fails(
        client.proxies.ScaleProxy(
            X.ScaleProxyRequest(name=made.name, instances=4), metadata=user.metadata
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "1 to 3" in violations(over)["instances"]
    only = await client.proxies.ScaleProxy(
        X.ScaleProxyRequest(name=made.name, instances=3, validate_only=True),
        metadata=user.metadata,
    )
    assert only.desired_instances == 1
    grown = await client.proxies.ScaleProxy(
        X.ScaleProxyRequest(name=made.name, instances=3), metadata=user.metadata
    )
    assert grown.desired_instances == 3
    events = await client.proxies.ListProxyScalingEvents(
        X.ListProxyScalingEventsRequest(parent=made.name), metadata=user.metadata
    )
    assert [(e.to_instances, e.applied, e.trigger) for e in events.events] == [
        (3, True, X.ProxyScalingEvent.TRIGGER_MANUAL),
        (3, False, X.ProxyScalingEvent.TRIGGER_MANUAL),
    ]
    assert events.events[0].actor == f"users/{user.id}"
    shrunk_policy = await client.proxies.UpdateProxy(
        X.UpdateProxyRequest(
            proxy=X.Proxy(
                name=made.name, config=X.ProxyConfig(scaling=X.ProxyScalingPolicy(max_instances=2))
            ),
            update_mask=Mask(paths=["config.scaling.max_instances"]),
        ),
        metadata=user.metadata,
    )
    assert shrunk_policy.desired_instances == 2  # a narrower policy brings the count in


async def test_a_stopped_proxy_refuses_changes(client: Client) -> None:
    user = await client.new_user(tag="proxy")
    made = await start(client, user)
    await client.proxies.StopProxy(X.StopProxyRequest(name=made.name), metadata=user.metadata)
    for call in (
        client.proxies.ScaleProxy(
            X.ScaleProxyRequest(name=made.name, instances=1), metadata=user.metadata
        ),
        client.proxies.RollbackProxyConfig(
            X.RollbackProxyConfigRequest(name=made.name, version=1), metadata=user.metadata
        ),
        client.proxies.UpdateProxy(
            X.UpdateProxyRequest(
                proxy=X.Proxy(name=made.name, config=X.ProxyConfig(max_connections=5)),
                update_mask=Mask(paths=["config.max_connections"]),
            ),
            metadata=user.metadata,
        ),
    ):
        error = await fails(call, grpc.StatusCode.FAILED_PRECONDITION)
        assert reason(error) == "PROXY_NOT_RUNNING"


async def test_a_user_runs_a_bounded_number_and_retries_are_safe(client: Client) -> None:
    user = await client.new_user(tag="proxy")
    first = await client.proxies.StartProxy(
        X.StartProxyRequest(parent="users/me", request_id="r-1"), metadata=user.metadata
    )
    retried = await client.proxies.StartProxy(
        X.StartProxyRequest(parent="users/me", request_id="r-1"), metadata=user.metadata
    )
    assert retried.name == first.name
    await start(client, user)
    await start(client, user)
    refused = await fails(start(client, user), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert reason(refused) == "PROXY_QUOTA_EXCEEDED"
    await client.proxies.StopProxy(X.StopProxyRequest(name=first.name), metadata=user.metadata)
    await start(client, user)  # a stopping proxy no longer counts


async def test_the_journey_over_http(client: Client, http: httpx.AsyncClient) -> None:
    user = await client.new_user(tag="proxy-http")
    headers = dict(user.metadata)
    made = await http.post(
        "/v1/users/me/proxies",
        json={"displayName": "web", "config": {"healthCheckInterval": "5s", "neverIdleStop": True}},
        headers=headers,
    )
    assert made.status_code == 200, made.text
    body = made.json()
    name = body["name"]
    assert body["state"] == "STATE_PROVISIONING"
    assert body["config"]["neverIdleStop"] is True
    assert body["config"]["healthCheckInterval"] == "5s"
    patched = await http.patch(
        f"/v1/{name}?updateMask=config.scaling.scale_up_cooldown",
        json={"config": {"scaling": {"scaleUpCooldown": "120s"}}},
        headers=headers,
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["config"]["scaling"]["scaleUpCooldown"] == "120s"
    bad = await http.patch(
        f"/v1/{name}?updateMask=config.retries", json={"config": {"retries": 11}}, headers=headers
    )
    assert bad.status_code == 400
    violation = bad.json()["details"][1]["fieldViolations"][0]
    assert violation["field"] == "proxy.config.retries"
    scaled = await http.post(f"/v1/{name}:scale", json={"instances": 2}, headers=headers)
    assert scaled.json()["desiredInstances"] == 2
    history = await http.get(f"/v1/{name}/scalingEvents", headers=headers)
    assert history.json()["events"][0]["toInstances"] == 2
    revisions = await http.get(f"/v1/{name}/configRevisions", headers=headers)
    assert [r["version"] for r in revisions.json()["revisions"]] == [2, 1]
    rolled = await http.post(f"/v1/{name}:rollbackConfig", json={"version": 1}, headers=headers)
    assert rolled.json()["configVersion"] == 3
    listed = await http.get("/v1/users/me/proxies?orderBy=display_name", headers=headers)
    assert [p["name"] for p in listed.json()["proxies"]] == [name]
    stopped = await http.post(f"/v1/{name}:stop", json={}, headers=headers)
    assert stopped.json()["state"] == "STATE_STOPPING"
    stranger = await client.new_user(tag="stranger")
    hidden = await http.get(f"/v1/{name}", headers=dict(stranger.metadata))
    assert hidden.status_code == 403


async def test_an_idle_proxy_stops_and_served_requests_keep_it_up(
    backend: Backend, tmp_path: Path
) -> None:
    clock = FakeClock()
    async with own_server(backend, tmp_path, clock=clock) as app:
        user = await app.identity.accounts.register(unique_email("idle"), PASSWORD, "")
        fleet, upkeep = app.proxies.fleet, app.proxies.upkeep
        made = await fleet.start(user.id, ProxyDraft("idle"), request_id="", actor="")
        await upkeep.placed(made.id, [Instance(f"{made.id}-0", "http://a", "a:1", "http://a:2")])
        for _ in range(2):
            await upkeep.checked(made.id, {f"{made.id}-0": Check(ok=True)})
        assert (await fleet.get(user.id, made.id)).state is ProxyState.RUNNING
        clock.advance(500)
        served = clock.now()
        await upkeep.checked(made.id, {f"{made.id}-0": Check(ok=True, last_request=served)})
        clock.advance(500)  # 1000 s since the start, 500 since the last request
        assert not await upkeep.stop_if_idle(await fleet.get(user.id, made.id))
        clock.advance(100)
        assert await upkeep.stop_if_idle(await fleet.get(user.id, made.id))
        stopped = await fleet.get(user.id, made.id)
        assert (stopped.state, stopped.state_reason) == (ProxyState.STOPPING, "idle for 600 s")
        assert stopped.last_active_time == served


async def test_a_watch_sends_the_current_proxies_then_each_change(
    client: Client, http: httpx.AsyncClient
) -> None:
    user = await client.new_user(tag="proxy-watch")
    made = await start(client, user, display_name="watched")
    stream = client.proxies.WatchProxies(
        X.WatchProxiesRequest(name="users/me"), metadata=user.metadata
    )
    current = await stream.read()
    assert (current.kind, current.proxy.name) == (W.KIND_CURRENT, made.name)
    assert (await stream.read()).kind == W.KIND_SYNCED
    await client.proxies.ScaleProxy(
        X.ScaleProxyRequest(name=made.name, instances=2), metadata=user.metadata
    )
    changed = await stream.read()
    assert (changed.kind, changed.event_type) == (W.KIND_CHANGED, "proxy.scaled")
    assert changed.proxy.desired_instances == 2
    stream.cancel()
    # Resumed after the scaling, over HTTP as SSE: the stop that came since, then live.
    await client.proxies.StopProxy(X.StopProxyRequest(name=made.name), metadata=user.metadata)
    headers = dict(user.metadata) | {"Accept": "text/event-stream",
                                     "Last-Event-ID": changed.event_id}  # fmt: skip
    async with http.stream("GET", f"/v1/{made.name}:watch", headers=headers) as response:
        assert response.status_code == 200
        lines: list[str] = []
        async for line in response.aiter_lines():
            lines.append(line)
            if "KIND_SYNCED" in line:
                break
    text = "\n".join(lines)
    assert "proxy.state_changed" in text
    assert "STATE_STOPPING" in text
    assert "proxy.scaled" not in text  # seen before the resume point


async def test_one_replica_at_a_time_leads_the_fleet(client: Client) -> None:
    engine = client.app.db.engine
    name = f"test-{unique_email('lead')}"
    first, second = Leadership(engine, name), Leadership(engine, name)
    try:
        assert await first.hold()
        if engine.dialect.name == "sqlite":  # one process's database: it leads
            assert await second.hold()
            return
        assert not await second.hold()
        assert await first.hold()  # still, and again
        await first.release()
        assert await second.hold()
        assert not await first.hold()
    finally:
        await first.release()
        await second.release()


class RecordingProvisioner:
    """Places instances without running them (their admin sides do not answer), and
    records what it was asked to run: the loop's calls are under test, not processes."""

    kind = "recording"

    def __init__(self) -> None:
        self.applied: list[Pool] = []

    async def apply(self, pool: Pool, admin_token: str) -> list[Instance]:  # noqa: ARG002
        self.applied.append(pool)
        return [
            Instance(f"{pool.proxy_id}-{n}", "http://127.0.0.1:9", "127.0.0.1:9",
                     "http://127.0.0.1:9")
            for n in range(pool.replicas)
        ]  # fmt: skip

    async def restart(self, proxy_id: str, instance_id: str) -> Instance | None:  # noqa: ARG002
        return None

    async def remove(self, proxy_id: str) -> None:
        pass

    async def instances(self, proxy_id: str) -> list[Instance]:  # noqa: ARG002
        return []

    async def close(self) -> None:
        pass


async def test_the_fleet_loop_asks_the_provisioner_only_when_something_changed(
    client: Client,
) -> None:
    app = client.app
    user = await client.new_user(tag="loop")
    made = await app.proxies.fleet.start(user.id, ProxyDraft("loop"), request_id="", actor="")
    now = [0.0]
    provisioner = RecordingProvisioner()
    loop = ProxyFleetLoop(
        app.proxies.upkeep, provisioner, InstanceAdminClient(lambda _: "t" * 32),
        lambda _: "t" * 32, clock=lambda: now[0],
    )  # fmt: skip
    try:
        proxy = await app.proxies.fleet.get(user.id, made.id)
        await loop.tend(proxy)
        assert len(provisioner.applied) == 1
        await loop.tend(await app.proxies.fleet.get(user.id, made.id))
        assert len(provisioner.applied) == 1  # nothing changed, no check due: no call
        await app.proxies.fleet.scale(user.id, made.id, 2, validate_only=False, actor="")
        await loop.tend(await app.proxies.fleet.get(user.id, made.id))
        assert [p.replicas for p in provisioner.applied] == [1, 2]  # a new count: at once
        now[0] += 1.5  # a check is due (every second while instances come up)
        await loop.tend(await app.proxies.fleet.get(user.id, made.id))
        assert len(provisioner.applied) == 3  # placed again with the check (what died)
    finally:
        await app.proxies.fleet.stop(user.id, made.id, actor="")
        await loop.close()
