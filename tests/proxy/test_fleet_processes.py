"""A user's own proxy with real processes: ``python -m server serve`` runs its instances as
children (the local provisioner), the agent links to them on its own, and a web client
reaches the local service through an instance. Then its config is changed and reaches the
running instance, the instance is killed and comes back, and the proxy is stopped; its
events reach a webhook receiver, signed (verified with ``standardwebhooks``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook as StandardWebhook

from tests.helpers import eventually
from tests.processes import ServerProcess, child_env, run_cli, serving
from tests.proxy.local_service import LocalService
from tests.proxy.test_processes import agent, setup_tunnel
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.slow
FAST_CHECKS = {"healthCheckInterval": "1s", "healthCheckTimeout": "0.5s"}


def instance_pids(server: ServerProcess) -> list[int]:
    """The pids of the instances the server started, in order."""
    return [
        int(e["pid"])  # type: ignore[call-overload]
        for e in server.log
        if e.get("message") == "proxy instance started"
    ]


@contextlib.asynccontextmanager
async def fleet_server(directory: Path) -> AsyncIterator[ServerProcess]:
    """A server with no embedded proxy: agents can reach web clients only through the
    user's own proxies."""
    env = child_env(directory, TP_PROXY_PORT="0", TP_PROXY_PROVISIONER="local",
                    TP_RATE_LIMIT_ENABLED="false")  # fmt: skip
    assert run_cli("migrate", env=env).returncode == 0
    async with serving(env) as server:
        log = asyncio.create_task(server.follow_log())
        try:
            yield server
        finally:
            log.cancel()


async def test_a_users_own_proxy_serves_recovers_takes_configs_and_stops(tmp_path: Path) -> None:
    local = await LocalService().start()
    receiver = await Receiver().start()
    async with fleet_server(tmp_path) as server:
        api = httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30)
        tunnel, token, key = await setup_tunnel(api, local.url)
        auth = {"Authorization": f"Bearer {token}"}
        hook = await api.post(
            "/v1/users/me/webhooks",
            json={"url": receiver.url(), "eventTypes": ["proxy.*"]},
            headers=auth,
        )
        secret = hook.json()["secret"]
        made = await api.post(
            "/v1/users/me/proxies", json={"displayName": "mine", "config": FAST_CHECKS},
            headers=auth,
        )  # fmt: skip
        name = made.json()["name"]

        async def proxy() -> dict[str, Any]:
            return (await api.get(f"/v1/{name}", headers=auth)).json()  # type: ignore[no-any-return]

        async def running() -> bool:
            found = await proxy()
            return found["state"] == "STATE_RUNNING" and all(
                i["health"] == "HEALTH_HEALTHY" for i in found["instances"]
            )

        await eventually(running, within=30, every=0.2)
        base = (await proxy())["instances"][0]["publicUrl"] + "/t/" + tunnel.rsplit("/", 1)[1]
        web = httpx.AsyncClient(timeout=30, headers=auth)

        async def served(**headers: str) -> httpx.Response | None:
            try:
                response = await web.get(base + "/echo", headers=headers)
            except httpx.TransportError:
                return None
            return response if response.status_code == 200 else None

        async with agent(server.grpc_port, tunnel, key, tmp_path):
            # The agent was told where the instance is, and linked to it.
            first = await eventually(lambda: served(**{"Accept-Encoding": "gzip"}), within=30)
            assert first.headers["content-encoding"] == "gzip"  # the default config: gzip 6
            assert first.json()["path"] == "/echo"

            # A config change reaches the running instance: gzip off.
            patched = await api.patch(
                f"/v1/{name}?updateMask=config.gzip_level",
                json={"config": {"gzipLevel": -1}},
                headers=auth,
            )
            assert patched.json()["configVersion"] == 2

            async def plain() -> bool:
                answer = await served(**{"Accept-Encoding": "gzip"})
                return answer is not None and "content-encoding" not in answer.headers

            await eventually(plain, within=15, every=0.2)

            # Its traffic, asked of the instance now, and the diagnostics bundle.
            metrics = (await api.get(f"/v1/{name}/metrics", headers=auth)).json()
            assert int(metrics["total"]["requests"]) >= 2  # int64: a JSON string
            assert int(metrics["total"]["requestsByClass"]["2xx"]) >= 2
            assert int(metrics["total"]["bytesOut"]) > 0
            assert [i["reachable"] for i in metrics["instances"]] == [True]
            bundle = (await api.get(f"/v1/{name}/diagnostics", headers=auth)).json()
            (seen,) = bundle["instances"]
            assert (seen["reachable"], seen["configVersion"]) == (True, 2)
            assert '"gzip_level": 0' in seen["effectiveConfig"].replace('":0', '": 0')
            assert any(line["message"] == "config applied" for line in seen["recentLogs"])
            assert bundle["proxy"]["instances"][0]["checks"][-1]["ok"] is True
            assert [r["version"] for r in bundle["configRevisions"]] == [2, 1]

            # Killed, the instance is started again in its place; traffic resumes.
            os.kill(instance_pids(server)[-1], signal.SIGKILL)

            async def restarted() -> bool:
                query = {"filter": 'type = "proxy.instance_restarted"'}
                found = await api.get("/v1/users/me/events", params=query, headers=auth)
                return bool(found.json().get("events"))

            await eventually(restarted, within=30, every=0.2)
            base = (await proxy())["instances"][0]["publicUrl"] + base[base.index("/t/") :]
            assert await eventually(served, within=30, every=0.2)
            await eventually(running, within=30, every=0.2)

        stopped = await api.post(f"/v1/{name}:stop", json={}, headers=auth)
        assert stopped.json()["state"] == "STATE_STOPPING"

        async def gone() -> bool:
            return (await proxy())["state"] == "STATE_STOPPED"

        await eventually(gone, within=30, every=0.2)
        for pid in instance_pids(server):
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        await web.aclose()

        # The proxy's life reached the webhook, signed.
        def types() -> list[str]:
            return [s.json["type"] for s in receiver.at("/hook")]

        await eventually(lambda: "proxy.stopped" in types(), within=30)
        for seen in receiver.at("/hook"):
            StandardWebhook(secret).verify(seen.body, seen.headers)
        for kind in ("proxy.started", "proxy.state_changed", "proxy.config_changed",
                     "proxy.instance_restarted", "proxy.stopped"):  # fmt: skip
            assert kind in types(), types()
        await api.aclose()
        server.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(server.process.wait(), 30) == 0
    await receiver.stop()
    await local.close()


async def test_load_scales_a_proxy_out_and_quiet_scales_it_back(tmp_path: Path) -> None:
    """In-flight streams over the policy's per-instance bound grow the proxy (a scaling
    event with its inputs); once they end, it shrinks back to its fewest."""
    local = await LocalService().start()
    async with fleet_server(tmp_path) as server:
        api = httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30)
        tunnel, token, key = await setup_tunnel(api, local.url)
        auth = {"Authorization": f"Bearer {token}"}
        scaling = {"maxInstances": 3, "maxStreamsPerInstance": 1,
                   "scaleUpCooldown": "0s", "scaleDownCooldown": "0s"}  # fmt: skip
        made = await api.post(
            "/v1/users/me/proxies",
            json={"config": {**FAST_CHECKS, "scaling": scaling}},
            headers=auth,
        )
        name = made.json()["name"]

        async def proxy() -> dict[str, Any]:
            return (await api.get(f"/v1/{name}", headers=auth)).json()  # type: ignore[no-any-return]

        async def healthy() -> bool:
            found = await proxy()
            return found["state"] == "STATE_RUNNING"

        await eventually(healthy, within=30, every=0.2)
        base = (await proxy())["instances"][0]["publicUrl"] + "/t/" + tunnel.rsplit("/", 1)[1]
        async with agent(server.grpc_port, tunnel, key, tmp_path):
            web = httpx.AsyncClient(timeout=60, headers=auth)

            async def linked() -> bool:
                try:
                    return (await web.get(base + "/echo")).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(linked, within=30, every=0.2)
            hanging = [asyncio.create_task(web.get(base + "/hang")) for _ in range(3)]

            async def grown() -> bool:
                return int((await proxy())["desiredInstances"]) > 1

            await eventually(grown, within=30, every=0.2)
            events = (await api.get(f"/v1/{name}/scalingEvents", headers=auth)).json()["events"]
            load = [e for e in events if e["trigger"] == "TRIGGER_LOAD"]
            assert load, events
            assert load[-1]["fromInstances"] == 1
            assert load[-1]["streams"] >= 2
            assert load[-1]["applied"] is True
            for task in hanging:
                task.cancel()
            await asyncio.gather(*hanging, return_exceptions=True)

            async def shrunk() -> bool:
                return int((await proxy())["desiredInstances"]) == 1

            await eventually(shrunk, within=60, every=0.3)
            await web.aclose()
        await api.aclose()
    await local.close()
