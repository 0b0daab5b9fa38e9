"""Streaming proxies against an OpenSSH reverse tunnel and against the service directly
(``make bench``; ``python -m bench.run --only proxy``; alone: ``python -m bench.proxies``).

Three paths to the same local services, all on loopback, measured in the same rounds:

- **direct**: the web client talks to the local service.
- **ssh**: ``ssh -R`` to Debian's sshd, started by the bench on a port of its own with a
  throw-away host key and client key: what people use today to expose a local port.
- **tunnelplane**: the control plane (``python -m server serve``, embedded defaults), a
  proxy (``python -m proxy``, TLS on its link) and one agent per tunnel (``python -m
  agent``, verifying the link's certificate); the web client talks to the proxy, which
  carries each request over the agent's outbound link.

The local services: nginx (1 KiB responses, a 100 MB file) and ``bench/stream_service.py``
(timestamped chunks; idle streams). Figures: requests per second and p99 of 1 KiB
responses with wrk at 50 connections; MB/s of a 100 MB download with curl; the time to
first byte and the latency of each chunk of a stream, added over direct; the proxy's RSS
per idle open stream with 1,000 of them. See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench import wrk
from bench.processes import ROOT, migrate, server_env
from tests.certs import self_signed

RESULTS_DIR = ROOT / "bench" / "results"
PATHS = ("direct", "ssh", "tunnelplane")
TARGETS = {
    "rps_vs_ssh": 1.0,
    "bulk_vs_ssh": 1.0,
    "added_first_byte_ms_p50": 2.0,
    "added_chunk_ms_p50": 2.0,
    "rss_kib_per_idle_stream": 100.0,
}


@dataclass(frozen=True, slots=True)
class Plan:
    """How much load."""

    rounds: int = 3
    seconds: int = 8
    connections: int = 50
    bulk_bytes: int = 100 * 1000 * 1000
    #: Downloads of ``/bulk`` per path and round (the median counts: one takes ~0.2 s).
    bulk_downloads: int = 3
    stream_requests: int = 20
    stream_chunks: int = 25
    stream_every: float = 0.02
    idle_streams: int = 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


@dataclass
class Processes:
    """Every child of the bench, stopped in reverse order."""

    children: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None,
              **kwargs: Any) -> subprocess.Popen[bytes]:  # fmt: skip
        out = log.open("ab")
        child = subprocess.Popen(
            list(argv), stdout=out, stderr=subprocess.STDOUT, env=dict(env or os.environ),
            cwd=ROOT, **kwargs,
        )  # fmt: skip
        self.children.append(child)
        return child

    def stop(self) -> None:
        for child in reversed(self.children):
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
        for child in reversed(self.children):
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def nginx(tmp: Path, procs: Processes, plan: Plan) -> int:
    """nginx serving ``/1k`` (1 KiB) and ``/bulk`` (``plan.bulk_bytes``) on a free port."""
    root = tmp / "www"
    root.mkdir()
    tmp.chmod(0o755)  # nginx's workers run as another user
    root.chmod(0o755)
    (root / "1k").write_bytes(b"x" * 1024)
    (root / "index.html").write_bytes(b"ok\n")
    with (root / "bulk").open("wb") as f:
        f.truncate(plan.bulk_bytes)
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"""daemon off; worker_processes 1; pid {tmp}/nginx.pid; error_log {tmp}/nginx.err;
events {{ worker_connections 4096; }}
http {{ access_log off; sendfile on; keepalive_requests 1000000;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  server {{ listen 127.0.0.1:{port}; root {root}; }} }}
"""
    )
    procs.start(["nginx", "-c", str(conf), "-p", str(tmp)], tmp / "nginx.log")
    wait_port(port)
    return port


def streams(tmp: Path, procs: Processes) -> int:
    port = free_port()
    procs.start([sys.executable, "-m", "bench.stream_service", str(port)], tmp / "stream.log")
    wait_port(port)
    return port


def ssh_reverse(tmp: Path, procs: Processes, targets: Sequence[int]) -> list[int]:
    """sshd on a free port, and one ``ssh -R`` carrying each of ``targets``."""
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / name)],
                       check=True)  # fmt: skip
    (tmp / "authorized_keys").write_bytes((tmp / "client.pub").read_bytes())
    (tmp / "authorized_keys").chmod(0o600)
    Path("/run/sshd").mkdir(exist_ok=True)
    port = free_port()
    procs.start(
        [sshd, "-D", "-e", "-p", str(port), "-o", "ListenAddress=127.0.0.1",
         "-h", str(tmp / "host"), "-o", f"AuthorizedKeysFile={tmp}/authorized_keys",
         "-o", "StrictModes=no", "-o", "PasswordAuthentication=no", "-o", "UsePAM=no",
         "-o", "PidFile=none", "-o", "AllowTcpForwarding=yes"],
        tmp / "sshd.log",
    )  # fmt: skip
    wait_port(port)
    remote = [free_port() for _ in targets]
    forwards = [arg for r, t in zip(remote, targets, strict=True)
                for arg in ("-R", f"127.0.0.1:{r}:127.0.0.1:{t}")]  # fmt: skip
    user = os.environ.get("USER") or "root"
    procs.start(
        ["ssh", "-N", "-p", str(port), "-i", str(tmp / "client"), "-o", "BatchMode=yes",
         "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={tmp}/known_hosts",
         "-o", "ExitOnForwardFailure=yes", *forwards, f"{user}@127.0.0.1"],
        tmp / "ssh.log",
    )  # fmt: skip
    for r in remote:
        wait_port(r)
    return remote


@dataclass
class Tunnelplane:
    """The control plane, one proxy and the agents; URLs of the tunnels at the proxy."""

    proxy_port: int
    proxy_pid: int
    agent_pids: list[int]
    urls: dict[int, str]


def tunnelplane(tmp: Path, procs: Processes, targets: Sequence[int]) -> Tunnelplane:
    cert, key = self_signed(tmp)
    grpc_port, http_port, link_port, proxy_port = (free_port() for _ in range(4))
    data = tmp / "tp"
    data.mkdir()
    env = server_env(data, {
        "TP_GRPC_PORT": str(grpc_port), "TP_HTTP_PORT": str(http_port),
        "TP_PROXY_PORT": "0", "TP_PROXY_LINKS": f"127.0.0.1:{link_port}",
        "TP_PROBE_INTERVAL": "1", "TP_PROBE_TIMEOUT": "0.5", "TP_LOG_LEVEL": "WARNING",
        # A run carries over 1 GiB, the free tier's monthly transfer: without this, the
        # control plane stops the tunnels mid-run, as it should.
        "TP_TIER_FREE_TRANSFER_BYTES_PER_MONTH": "-1",
        "TP_TIER_FREE_STREAM_SECONDS_PER_MONTH": "-1",
    })  # fmt: skip
    migrate(env, tmp / "server.log")
    procs.start([sys.executable, "-m", "server", "serve"], tmp / "server.log", env)
    wait_port(http_port)
    proxy = procs.start(
        [sys.executable, "-m", "proxy", "--control-plane", f"127.0.0.1:{grpc_port}",
         "--port", str(proxy_port), "--link-port", str(link_port),
         "--link-tls-cert", str(cert), "--link-tls-key", str(key), "--log-level", "WARNING"],
        tmp / "proxy.log",
    )  # fmt: skip
    wait_port(proxy_port)
    api = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30)
    account = {"email": "bench@example.com", "password": "a bench password, long"}
    api.post("/v1/auth:register", json=account).raise_for_status()
    login = api.post("/v1/auth:login", json=account).raise_for_status().json()
    token = login["tokens"]["accessToken"]
    api.headers["Authorization"] = f"Bearer {token}"
    urls, agents = {}, []
    for target in targets:
        tunnel = api.post("/v1/users/me/tunnels", json={
            "displayName": f"bench-{target}",
            "endpoints": [{"url": f"http://127.0.0.1:{target}"}],
            "config": {"webAccess": "WEB_ACCESS_PUBLIC"},
        }).raise_for_status().json()["name"]  # fmt: skip
        api.post(f"/v1/{tunnel}:start", json={}).raise_for_status()
        secret = api.post("/v1/users/me/apiKeys", json={
            "displayName": f"agent {target}", "scopes": ["agent.connect"], "tunnel": tunnel,
        }).raise_for_status().json()["secret"]  # fmt: skip
        agent = procs.start(
            [sys.executable, "-m", "agent", "--control-plane", f"127.0.0.1:{grpc_port}",
             "--tunnel", tunnel, "--target", f"127.0.0.1:{target}", "--listen-host",
             "127.0.0.1", "--link-ca-file", str(cert), "--log-level", "WARNING"],
            tmp / f"agent-{target}.log", {**os.environ, "TP_AGENT_KEY": secret},
        )  # fmt: skip
        agents.append(agent.pid)
        urls[target] = f"http://127.0.0.1:{proxy_port}/t/{tunnel.rsplit('/', 1)[1]}"
    for url in urls.values():
        deadline = time.monotonic() + 60
        while httpx.get(url + "/", timeout=10).status_code >= 500:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the tunnel at {url} never came up")
            time.sleep(0.2)
    return Tunnelplane(proxy_port, proxy.pid, agents, urls)


def load_1k(url: str, plan: Plan) -> dict[str, float]:
    load = wrk.Load(url=url, token="", seconds=plan.seconds, connections=plan.connections)
    summary = wrk.parse_summary(wrk.run(load))
    wrk.check(summary)
    return {"rps": summary.requests_per_second, "p99_ms": summary.p99_ms}


def bulk(url: str) -> float:
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{speed_download}", url],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return float(out) / 1e6


async def stream_latencies(url: str, plan: Plan) -> dict[str, float]:
    """Per request: time to the first chunk; per chunk: written-to-received, in ms."""
    first, chunks = [], []
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(plan.stream_requests):
            started = time.monotonic_ns()
            params = {"n": plan.stream_chunks, "every": plan.stream_every}
            async with client.stream("GET", url + "/stream", params=params) as response:
                buffer, seen = b"", 0
                async for piece in response.aiter_raw():
                    now = time.monotonic_ns()
                    buffer += piece
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if seen == 0:
                            first.append((now - started) / 1e6)
                        chunks.append((now - int(line)) / 1e6)
                        seen += 1
    return {"first_byte_ms_p50": statistics.median(first),
            "chunk_ms_p50": statistics.median(chunks),
            "chunk_ms_p99": statistics.quantiles(chunks, n=100)[98]}  # fmt: skip


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no RSS for {pid}")


async def idle_streams(url: str, count: int, pids: Mapping[str, int]) -> dict[str, float]:
    """Open ``count`` idle streams; RSS per stream of each process in ``pids``."""
    host, port = url.split("/")[2].split(":")
    path = "/" + url.split("/", 3)[3] + "/idle"
    before = {name: rss_kib(pid) for name, pid in pids.items()}
    writers = []
    try:
        for _ in range(count):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            writers.append((reader, writer))
        for reader, _ in writers:  # every stream is open: its headers and first bytes came
            await asyncio.wait_for(reader.readuntil(b": open\n\n"), 60)
        await asyncio.sleep(1)
        during = {name: rss_kib(pid) for name, pid in pids.items()}
    finally:
        for _, writer in writers:
            writer.close()
    return {f"{name}_kib_per_stream": (during[name] - before[name]) / count for name in pids}


def measure(plan: Plan, tmp: Path) -> dict[str, Any]:
    # Every process floats over every CPU (the GetUser part pins the bench to one).
    os.sched_setaffinity(0, range(os.cpu_count() or 1))
    procs = Processes()
    try:
        web = nginx(tmp, procs, plan)
        stream_port = streams(tmp, procs)
        ssh_ports = ssh_reverse(tmp, procs, [web, stream_port])
        tp = tunnelplane(tmp, procs, [web, stream_port])
        base = {
            "direct": (f"http://127.0.0.1:{web}", f"http://127.0.0.1:{stream_port}"),
            "ssh": (f"http://127.0.0.1:{ssh_ports[0]}", f"http://127.0.0.1:{ssh_ports[1]}"),
            "tunnelplane": (tp.urls[web], tp.urls[stream_port]),
        }
        rounds: list[dict[str, Any]] = []
        for number in range(plan.rounds):
            order = PATHS if number % 2 == 0 else tuple(reversed(PATHS))
            result: dict[str, Any] = {}
            for path in order:
                web_url, stream_url = base[path]
                load_1k(web_url + "/1k", replace_seconds(plan, 2))  # warm-up
                try:
                    result[path] = {
                        **load_1k(web_url + "/1k", plan),
                        "bulk_mb_s": statistics.median(
                            bulk(web_url + "/bulk") for _ in range(plan.bulk_downloads)
                        ),
                        **asyncio.run(stream_latencies(stream_url, plan)),
                    }
                except Exception as exc:
                    raise RuntimeError(f"round {number}, path {path}: {exc!r}") from exc
            rounds.append(result)
        pids = {"proxy": tp.proxy_pid, "agent": tp.agent_pids[1]}
        memory = asyncio.run(idle_streams(base["tunnelplane"][1], plan.idle_streams, pids))
        return {"rounds": rounds, "memory": memory, "commands": commands(plan)}
    finally:
        procs.stop()


def replace_seconds(plan: Plan, seconds: int) -> Plan:
    return Plan(**{**asdict(plan), "seconds": seconds})


def commands(plan: Plan) -> dict[str, str]:
    return {
        "1k": f"wrk -t1 -c{plan.connections} -d{plan.seconds}s --latency URL/1k",
        "bulk": f"curl -s -o /dev/null -w %{{speed_download}} URL/bulk, "
        f"median of {plan.bulk_downloads} per round",
        "streaming": (
            f"{plan.stream_requests} GETs of URL/stream?n={plan.stream_chunks}"
            f"&every={plan.stream_every} (httpx, one at a time)"
        ),
        "memory": f"{plan.idle_streams} open GETs of URL/idle; VmRSS before and during",
    }


def summarize(measured: Mapping[str, Any]) -> dict[str, Any]:
    def median(path: str, key: str) -> float:
        return statistics.median(r[path][key] for r in measured["rounds"])

    figures = {path: {key: median(path, key) for key in measured["rounds"][0][path]}
               for path in PATHS}  # fmt: skip
    tp, ssh, direct = figures["tunnelplane"], figures["ssh"], figures["direct"]
    results = {
        "rps_vs_ssh": tp["rps"] / ssh["rps"],
        "bulk_vs_ssh": tp["bulk_mb_s"] / ssh["bulk_mb_s"],
        "added_first_byte_ms_p50": tp["first_byte_ms_p50"] - direct["first_byte_ms_p50"],
        "added_chunk_ms_p50": tp["chunk_ms_p50"] - direct["chunk_ms_p50"],
        "rss_kib_per_idle_stream": measured["memory"]["proxy_kib_per_stream"],
    }
    lower_is_better = {"added_first_byte_ms_p50", "added_chunk_ms_p50", "rss_kib_per_idle_stream"}
    verdicts = {
        name: {"value": round(value, 3), "target": TARGETS[name],
               "met": value < TARGETS[name] if name in lower_is_better else value >= TARGETS[name]}
        for name, value in results.items()
    }  # fmt: skip
    return {"medians": figures, "targets": verdicts, "memory": measured["memory"]}


def render(summary: Mapping[str, Any], measured: Mapping[str, Any]) -> str:
    lines = ["Streaming proxies: tunnelplane (proxy + agent, TLS link) vs ssh -R vs direct",
             "", (f"{'path':<12} {'1k req/s':>9} {'p99 ms':>7} {'bulk MB/s':>9} "
             f"{'1st byte ms':>11} {'chunk ms p50':>12} {'p99':>7}")]  # fmt: skip
    for path, f in summary["medians"].items():
        lines.append(
            f"{path:<12} {f['rps']:>9.0f} {f['p99_ms']:>7.1f} {f['bulk_mb_s']:>9.0f} "
            f"{f['first_byte_ms_p50']:>11.2f} {f['chunk_ms_p50']:>12.3f} {f['chunk_ms_p99']:>7.3f}"
        )
    lines += ["", "Targets (medians of the rounds):"]
    for name, v in summary["targets"].items():
        lines.append(f"  {name:<26} {v['value']:>9} target {v['target']:<6} "
                     f"{'met' if v['met'] else 'MISSED'}")  # fmt: skip
    lines += ["", "Memory with idle open streams: " + ", ".join(
        f"{k} {v:.1f} KiB" for k, v in summary["memory"].items())]  # fmt: skip
    lines += ["", "Rounds:"] + [json.dumps(r) for r in measured["rounds"]]
    lines += ["", "Commands:"] + [f"  {k}: {v}" for k, v in measured["commands"].items()]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.proxies")
    parser.add_argument("--rounds", type=int, default=Plan().rounds)
    parser.add_argument("--seconds", type=int, default=Plan().seconds)
    parser.add_argument("--no-publish", action="store_true", help="print, write no results")
    args = parser.parse_args(argv)
    plan = Plan(rounds=args.rounds, seconds=args.seconds)
    with tempfile.TemporaryDirectory(prefix="tp-bench-proxy-") as tmp:
        measured = measure(plan, Path(tmp))
    summary = summarize(measured)
    text = render(summary, measured)
    sys.stdout.write(text)
    if not args.no_publish:
        day = datetime.now(UTC).date().isoformat()
        RESULTS_DIR.mkdir(exist_ok=True)
        (RESULTS_DIR / f"proxy-{day}.txt").write_text(text)
        (RESULTS_DIR / f"proxy-{day}.json").write_text(
            json.dumps({"summary": summary, **measured}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
