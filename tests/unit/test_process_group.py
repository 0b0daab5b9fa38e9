"""What the supervisor of ``TP_WORKERS`` decides on its own: which shared backends are
missing, and the settings each worker gets."""

from __future__ import annotations

import os
import socket

import pytest

from server.process_group import (
    Ports,
    missing_backends,
    reserve_port,
    worker_cpu,
    worker_environment,
)
from server.settings import Settings, SettingsError

POSTGRES = "postgresql+psycopg://u@db:5432/tp"


@pytest.mark.parametrize(
    ("database_url", "redis_url", "missing"),
    [
        ("", "", ["TP_DATABASE_URL", "TP_REDIS_URL"]),
        ("sqlite+aiosqlite:///var/tp.db", "redis://r:6379/0", ["TP_DATABASE_URL"]),
        (POSTGRES, "", ["TP_REDIS_URL"]),
        ("postgresql://u@db/tp", "redis://r:6379/0", []),
        (POSTGRES, "redis://r:6379/0", []),
    ],
)
def test_missing_backends_are_named(database_url: str, redis_url: str, missing: list[str]) -> None:
    settings = Settings(database_url=database_url, redis_url=redis_url, workers=2)
    found = missing_backends(settings)
    assert [text.split()[0] for text in found] == missing


@pytest.mark.parametrize(
    ("metrics", "expected"), [(9464, ["9464", "9465", "9466"]), (0, ["0"] * 3), (-1, ["-1"] * 3)]
)
def test_each_worker_has_a_metrics_port_of_its_own(metrics: int, expected: list[str]) -> None:
    settings = Settings(workers=3, password_hash_concurrency=2)
    ports = Ports(grpc=5000, http=-1, metrics=metrics)
    envs = [worker_environment(settings, ports, index) for index in range(3)]
    assert [env["TP_METRICS_PORT"] for env in envs] == expected
    assert {(env["TP_GRPC_PORT"], env["TP_HTTP_PORT"], env["TP_WORKERS"]) for env in envs} == {
        ("5000", "-1", "3")
    }
    # A hash concurrency the operator chose is left alone.
    assert all("TP_PASSWORD_HASH_CONCURRENCY" not in env for env in envs)


def test_the_default_hash_concurrency_is_shared_among_workers() -> None:
    cpus = len(os.sched_getaffinity(0))
    for workers in (1, 2, cpus, cpus * 4):
        env = worker_environment(Settings(workers=workers), Ports(1, 2, -1), 0)
        assert env["TP_PASSWORD_HASH_CONCURRENCY"] == str(max(1, cpus // workers))


def test_a_port_another_server_listens_on_is_refused_naming_it() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            reserve_port("127.0.0.1", port)


def test_a_port_left_in_time_wait_by_the_last_server_is_reserved_again() -> None:
    """A restart must not wait for the last process's connections on its port."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server side closes first: its end waits in TIME_WAIT
        client.close()
    reserve_port("127.0.0.1", port).close()


@pytest.mark.parametrize(
    ("cpus", "expected"),
    [({0, 1}, [0, 1, 0, 1]), ({3, 1, 7}, [1, 3, 7, 1]), ({5}, [5, 5, 5, 5])],
)
def test_pinned_workers_take_the_allowed_cpus_in_turn(cpus: set[int], expected: list[int]) -> None:
    assert [worker_cpu(index, cpus) for index in range(4)] == expected


def test_cpu_affinity_is_off_by_default_and_refuses_unknown_values() -> None:
    assert Settings.from_env({}).worker_cpu_affinity == "off"
    assert Settings.from_env({"TP_WORKER_CPU_AFFINITY": "auto"}).worker_cpu_affinity == "auto"
    with pytest.raises(SettingsError, match="TP_WORKER_CPU_AFFINITY"):
        Settings.from_env({"TP_WORKER_CPU_AFFINITY": "all"})
