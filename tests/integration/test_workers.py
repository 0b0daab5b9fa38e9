"""Every background loop of a real server runs under its supervisor (server/workers/): each
shows on /metrics, and one whose dependency drops it (the event bus's reader, when Redis
goes away) is restarted with back-off, counted, and back at work when Redis is."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.request import urlopen

from server.app import App
from server.storage.bus import RedisBus
from tests.conftest import REDIS_URL, Backend, make_settings, own_server
from tests.helpers import eventually
from tests.tcpproxy import in_front_of_redis

TIMEOUT = 20.0
#: The loops of a server with the default settings, in the order they start.
LOOPS = [
    "purge",
    "load",
    "violations",
    "violations-prune",
    "usage-rollup",
    "agent-sweep",
    "prober",
    "webhook-headers",
    "webhook-records",
    "webhooks",
    "operations",
    "health",
    "call-outcomes",
    "call-outcomes-prune",
    "notifications",
]


def scrape(port: int) -> str:
    return urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def sample(server: App, name: str, loop: str) -> float:
    return server.registry.get_sample_value(name, {"loop": loop}) or 0.0


async def test_every_loop_runs_supervised_and_shows_on_metrics(
    backend: Backend, tmp_path: Path
) -> None:
    async with own_server(backend, tmp_path, metrics_port=0) as server:
        expected = (["event-bus"] if backend.redis_url else []) + LOOPS
        assert server.supervisor.names == expected
        for loop in ("health", "prober", "operations", "webhook-headers", "purge"):
            await eventually(
                lambda loop=loop: (
                    sample(  # type: ignore[misc]
                        server, "tunnelplane_worker_last_success_timestamp_seconds", loop
                    )
                    > 0
                )
            )
        text = await asyncio.to_thread(scrape, server.metrics_port)
    for loop in expected:
        assert f'tunnelplane_worker_errors_total{{loop="{loop}"}} 0.0' in text
        assert f'tunnelplane_worker_restarts_total{{loop="{loop}"}} 0.0' in text
    assert 'tunnelplane_worker_last_success_timestamp_seconds{loop="health"}' in text
    assert 'tunnelplane_worker_step_seconds_bucket{le="+Inf",loop="health"}' in text
    assert 'tunnelplane_worker_step_seconds_count{loop="prober"}' in text


async def test_a_loop_whose_redis_goes_away_is_restarted_and_recovers(
    postgres_database: str, tmp_path: Path
) -> None:
    from tests.conftest import migrate, require_redis

    require_redis()
    proxy = await in_front_of_redis(REDIS_URL)
    await migrate(postgres_database)
    server = App(
        make_settings(
            tmp_path,
            database_url=postgres_database,
            redis_url=f"redis://127.0.0.1:{proxy.port}/0",
        )
    )
    await server.start()
    try:
        bus = server.events.bus
        assert isinstance(bus, RedisBus)
        async with asyncio.timeout(TIMEOUT):
            await bus.wait_connected()
        await proxy.cut()  # the subscription's connection breaks: its step raises
        await eventually(lambda: sample(server, "tunnelplane_worker_errors_total", "event-bus") > 0)
        await proxy.start()
        await eventually(
            lambda: sample(server, "tunnelplane_worker_restarts_total", "event-bus") > 0
        )
        async with asyncio.timeout(TIMEOUT):
            await bus.wait_connected()  # subscribed again by a restarted step
    finally:
        await server.stop(grace=0)
        await proxy.cut()
