"""The admin's user search at 100,000 users on PostgreSQL: ``python -m bench.user_search``
(``make bench`` runs it as its ``search`` part).

A database of its own on the bench's PostgreSQL, migrated, then filled with 100,000 users
by ``COPY`` (tiers 80/15/5 % free/premium/enterprise, 2 % suspended, 1 % deleted, sign-up
times over two years, 70 % signed in within 90 days). One full server
(``bench.server --mode full``) serves ``UserService.ListUsers`` to a super admin; h2load
sends each query shape below (50 users a page, the first page) from 4 clients, one
stream each, and the per-request times of its ``--log-file`` give p50/p95/p99. Then, in
the same run and against the same server, the search indexes of migration 0012 are
dropped (and the table analysed again), and every shape is measured again: the baseline.
Before each shape's load one real call must return users.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import psycopg
from tunnelplane.v1 import users_pb2, users_pb2_grpc

from bench import h2load, probes
from bench.processes import ServerProcess, migrate, server_env
from bench.webhooks import DEFAULT_POSTGRES_URL, Postgres
from server.domain.common.ids import new_id

USERS = 100_000
REQUESTS = 2_000
CLIENTS = 4
#: p95 of every shape with the indexes, at 100,000 users.
TARGET_P95_MS = 50.0
#: Migration 0012's indexes: dropped for the baseline.
SEARCH_INDEXES = (
    "ix_users_tier_create_time_id",
    "ix_users_role_create_time_id",
    "ix_users_state_create_time_id",
    "ix_users_last_login_time",
    "ix_users_email_trgm",
    "ix_users_display_name_trgm",
)
NOW = datetime(2026, 12, 1, tzinfo=UTC)
SHAPES: dict[str, users_pb2.ListUsersRequest] = {
    "first page": users_pb2.ListUsersRequest(page_size=50),
    "tier": users_pb2.ListUsersRequest(page_size=50, filter='tier = "enterprise"'),
    "state": users_pb2.ListUsersRequest(page_size=50, filter='state = "suspended"'),
    "email substring": users_pb2.ListUsersRequest(page_size=50, filter='email : "rivera4"'),
    "rare email substring": users_pb2.ListUsersRequest(page_size=50, filter='email : "4242@"'),
    "name substring, by email": users_pb2.ListUsersRequest(
        page_size=50, filter='display_name : "ada"', order_by="email"
    ),
    "last sign-in range and tier": users_pb2.ListUsersRequest(
        page_size=50,
        filter=(
            f'last_login_time >= "{(NOW - timedelta(days=3)).isoformat()}" AND tier = "premium"'
        ),
    ),
    "newest first": users_pb2.ListUsersRequest(page_size=50, order_by="create_time desc"),
}
FIRST = ("ada", "ben", "chloe", "dmitri", "eve", "farah", "goran", "hana", "ivan", "jun")
LAST = ("rivera", "okafor", "nakamura", "schmidt", "dubois", "silva", "kowalski", "haddad")
DOMAINS = ("example.com", "example.org", "mail.example.net", "corp.example")


@dataclass(frozen=True, slots=True)
class Shape:
    """One query shape's run."""

    name: str
    matched: int
    p50: float
    p95: float
    p99: float
    requests_per_second: float


def seed(url: str, count: int, preferences: str) -> None:
    """``count`` users by COPY, then ANALYZE."""
    rng = random.Random(42)  # noqa: S311 - test data
    buffer = io.StringIO()
    for i in range(count):
        created = NOW - timedelta(seconds=rng.uniform(0, 2 * 365 * 86400))
        tier = rng.choices(("free", "premium", "enterprise"), (80, 15, 5))[0]
        state = rng.choices(("active", "suspended", "deleted"), (97, 2, 1))[0]
        first, last = rng.choice(FIRST), rng.choice(LAST)
        login = NOW - timedelta(seconds=rng.uniform(0, 90 * 86400)) if rng.random() < 0.7 else None
        deleted = (created + timedelta(days=1)).isoformat() if state == "deleted" else r"\N"
        row = (
            new_id("usr", created.timestamp()),
            f"{first}.{last}{i}@{rng.choice(DOMAINS)}",
            f"{first.title()} {last.title()}",
            r"\N",
            "user",
            tier,
            state,
            preferences,
            "false",
            "1",
            created.isoformat(),
            created.isoformat(),
            deleted,
            deleted,
            login.isoformat() if login else r"\N",
        )
        buffer.write("\t".join(row) + "\n")
    columns = (
        "id, email, display_name, password_hash, role, tier, state, preferences, has_avatar, "
        "version, create_time, update_time, delete_time, purge_time, last_login_time"
    )
    with psycopg.connect(url, autocommit=True) as conn:
        with conn.cursor().copy(f"COPY users ({columns}) FROM STDIN") as copy:
            copy.write(buffer.getvalue())
        conn.execute("ANALYZE users")


def measure_shapes(
    server: ServerProcess, caller: probes.Caller, work_dir: Path, label: str
) -> list[Shape]:
    """Each shape: one real call, then h2load; its latencies."""
    shapes = []
    for name, request in SHAPES.items():
        with grpc.insecure_channel(f"127.0.0.1:{server.ports['grpc']}") as channel:
            found = users_pb2_grpc.UserServiceStub(channel).ListUsers(
                request, metadata=caller.metadata, timeout=30
            )
        if not found.users:
            raise RuntimeError(f"the shape {name!r} found no users")
        slug = name.replace(" ", "-").replace(",", "")
        body = work_dir / f"{label}-{slug}.bin"
        body.write_bytes(h2load.grpc_frame(request))
        load = h2load.Load(
            url=server.url("grpc", "/tunnelplane.v1.UserService/ListUsers"),
            token=caller.access_token,
            body_file=body,
            requests=REQUESTS,
            clients=CLIENTS,
            log_file=work_dir / f"{label}-{slug}.log",
            request_id=None,
        )
        summary = h2load.parse_summary(h2load.run(load))
        frame = len(h2load.grpc_frame(found))
        h2load.check(summary, REQUESTS, frame)
        times = h2load.latencies_ms(load.log_file)
        shapes.append(
            Shape(
                name,
                len(found.users),
                h2load.percentile(times, 0.50),
                h2load.percentile(times, 0.95),
                h2load.percentile(times, 0.99),
                summary.requests_per_second,
            )
        )
    return shapes


@contextmanager
def database(postgres_url: str) -> Iterator[str]:
    """A fresh database, dropped afterwards."""
    postgres = Postgres(postgres_url)
    name = f"tpbench_search_{secrets.token_hex(4)}"
    url = postgres.create(name)
    try:
        yield url
    finally:
        postgres.drop(name)


def measure(postgres_url: str, work_dir: Path, users: int = USERS) -> dict[str, Any]:
    """Seed, serve, measure with and without the indexes; the results."""
    with database(postgres_url) as url:
        env = server_env(work_dir / "search", {"TP_DATABASE_URL": url})
        (work_dir / "search").mkdir(parents=True, exist_ok=True)
        migrate(env, work_dir / "search-migrate.log")
        with ServerProcess(["--mode", "full"], env, work_dir / "search-server.log") as server:
            caller = probes.sign_up(server.ports["grpc"])
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(
                    "UPDATE users SET role = 'super_admin' WHERE id = %s", (caller.user_id,)
                )
                row = conn.execute("SELECT preferences::text FROM users LIMIT 1").fetchone()
            assert row is not None
            # The caller's role is read per call (the subject cache), not from its token:
            # the promotion above holds for the token it has.
            seed(url, users, row[0])
            indexed = measure_shapes(server, caller, work_dir, "indexed")
            with psycopg.connect(url, autocommit=True) as conn:
                for index in SEARCH_INDEXES:
                    conn.execute(f"DROP INDEX IF EXISTS {index}")
                conn.execute("ANALYZE users")
            plain = measure_shapes(server, caller, work_dir, "unindexed")
    return {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "users": users + 1,
        "requests": REQUESTS,
        "clients": CLIENTS,
        "target_p95_ms": TARGET_P95_MS,
        "indexed": [_shape(s) for s in indexed],
        "unindexed": [_shape(s) for s in plain],
    }


def _shape(shape: Shape) -> dict[str, Any]:
    return {
        "name": shape.name,
        "matched": shape.matched,
        "p50_ms": round(shape.p50, 2),
        "p95_ms": round(shape.p95, 2),
        "p99_ms": round(shape.p99, 2),
        "requests_per_second": round(shape.requests_per_second, 1),
    }


def render(results: dict[str, Any]) -> str:
    """The README block."""
    plain = {s["name"]: s for s in results["unindexed"]}
    lines = [
        (
            f"Latest run: {results['time']}, {results['users']:,} users on PostgreSQL, "
            f"{results['requests']:,} ListUsers calls per shape from {results['clients']} clients "
            "(h2load, one stream each), 50 users a page. Raw numbers: `results/search-*.json`."
        ),
        "",
        (
            "| shape | users on the page | p50 ms | p95 ms | p99 ms | req/s "
            "| p95 ms without the indexes |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in results["indexed"]:
        base = plain[s["name"]]
        lines.append(
            f"| {s['name']} | {s['matched']} | {s['p50_ms']:.1f} | {s['p95_ms']:.1f} "
            f"| {s['p99_ms']:.1f} | {s['requests_per_second']:.0f} | {base['p95_ms']:.1f} |"
        )
    worst = max(s["p95_ms"] for s in results["indexed"])
    met = "met" if worst <= results["target_p95_ms"] else "**missed**"
    lines += [
        "",
        (
            f"Target: every shape's p95 at most {results['target_p95_ms']:.0f} ms with the "
            f"indexes: worst {worst:.1f} ms, {met}."
        ),
        "",
        "Made by `make bench` (its `search` part), or `python -m bench.user_search --publish`.",
    ]
    return "\n".join(lines)


def publish(results: dict[str, Any], results_dir: Path, readme: Path) -> list[Path]:
    """Write the JSON and the README block."""
    from bench import report

    path = results_dir / f"search-{results['time'][:10]}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    report.update_readme(readme, {"search-results": render(results)})
    return [path, readme]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.user_search", description=__doc__)
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    parser.add_argument("--users", type=int, default=USERS)
    parser.add_argument("--publish", action="store_true", help="write results/ and README")
    args = parser.parse_args(argv)
    work_dir = Path(tempfile.mkdtemp(prefix="tunnelplane-search-"))
    try:
        results = measure(args.postgres_url, work_dir, args.users)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    print(render(results))
    if args.publish:
        from bench.run import README, RESULTS_DIR

        publish(results, RESULTS_DIR, README)
    return 0


if __name__ == "__main__":
    sys.exit(main())
