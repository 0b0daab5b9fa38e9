"""Several server processes on one host: ``TP_WORKERS=N`` (``python -m server serve
--workers N``).

One server process runs one event loop on one core. With ``N`` workers, a small
*supervisor* process starts ``N`` copies of the server (``python -m server serve
--worker-index I --control-fd F``) that listen on the same gRPC and HTTP ports with
``SO_REUSEPORT``: the kernel spreads incoming connections over them. The workers are
replicas in every respect, sharing their state through PostgreSQL and Redis exactly as
replicas on different hosts do, so more than one worker needs both (the supervisor refuses
to start without them, naming what is missing): SQLite is one process's file, and without
Redis the rate limiter, revocations, caches and watch streams would stay inside each
process.

**Ports.** The supervisor binds (without listening) one ``SO_REUSEPORT`` socket per port
and keeps it for the life of the group: with port 0 this picks the one port every worker
then binds, and it keeps the port reserved while a worker restarts. Connections go only
to listening sockets, so the supervisor's never receives one.

**Supervision.** Each worker has a control socket (a socketpair) to the supervisor: it
writes one line when it serves, and stops as on SIGTERM when the supervisor's end closes
(the supervisor died). The group is up when every worker has said it serves; if one exits
before that, the others are stopped and the supervisor exits with 1. SIGTERM or SIGINT to
the supervisor is passed to every worker, which drains as a single server does
(``TP_SHUTDOWN_GRACE``); a worker still running ``grace + STOP_MARGIN`` seconds later is
killed, and the supervisor exits with 0 only if every worker stopped as told (with 0, or
by the signal itself when it came before the worker had finished starting). A worker
that dies unexpectedly (a non-zero status or a signal: a crash, the OOM killer) is
replaced at once; a replacement that fails to start stops the group (exit 1), so a worker
that cannot start is never retried in a loop. A worker that exits with 0 was told to stop
(a signal from outside, as systemd sends to every process of a unit) and is not replaced.

**Logs.** Every line a worker writes carries ``worker`` (its index) and ``pid``; the
supervisor's carry ``supervisor: true`` and ``pid``. Workers write to the supervisor's
stderr directly (one ``write`` per line), nothing is relayed.

**Metrics.** Each worker keeps its own Prometheus registry and serves it on a port of its
own: ``TP_METRICS_PORT + index`` (with 0, each picks a free port; the supervisor's
``serving`` line lists them). Scrape every worker as a target of its own; the series
differ by ``instance``, and ``sum by (...)`` adds them up. (prometheus_client's
multiprocess mode would serve one port, but it stores every metric in files shared through
a directory, ignores the registries the composition root hands out, and supports neither
gauges computed on scrape, as the rate limiter's load gauges are, nor custom collectors.)

**CPUs.** By default the kernel places the workers and moves them as it sees fit. With
``TP_WORKER_CPU_AFFINITY=auto`` (nginx's ``worker_cpu_affinity auto``), worker ``i``
pins itself, every thread included, to the ``i``-th CPU the supervisor may use, before it
starts anything. On a host whose cores serve this group only, that keeps each worker's
caches warm and stops grpc's threads of one worker from running on another's core
(measured on 2 CPUs: two pinned workers serve GetUser over gRPC 1.5 times as fast as one,
unpinned 1.1 times; ``bench/README.md``). Leave it off where the CPUs are shared or
limited by a quota rather than a CPU set (a container with a CPU limit): a pinned worker
cannot move to an idle core.

**Per-process budgets.** Settings that size one process stay per process:
``TP_DATABASE_POOL_SIZE`` (N pools), ``TP_WEBHOOK_CONCURRENCY``,
``TP_HTTP_MAX_CONNECTIONS_PER_ADDRESS`` (the kernel, not the client, picks the worker, so
a client may hold up to N times the cap), ``TP_LOAD_*`` (each worker sheds load by its own
loop's lag). The exception is ``TP_PASSWORD_HASH_CONCURRENCY=0`` ("one per CPU"), a budget
of the host: each worker gets its share, ``max(1, cpus // N)``.

**Background loops.** Every worker runs every loop (``server/workers/``, named as in
the ``loop`` label of their metrics); none needs electing, because each is either about its
own process or claims its work in the database so that one replica does each piece. This
is what already lets replicas on several hosts run side by side:

==================  ====================  =================================================
loop                runs in               why there
==================  ====================  =================================================
health              every worker          the health of its own listeners and connections
load                every worker          its own event loop's lag
violations          every worker          writes the refusals this process counted
violations-prune    every worker          deleting expired rows twice deletes them once
usage-rollup        every worker          writes the counts of this process's calls; a row
                                          only ever rises to the figure written
event-bus           every worker (Redis)  its watch streams must hear every replica's events
purge               every worker          erasing a due user twice erases it once
agent-sweep         every worker          idempotent conditional updates
prober              every worker          a probe is claimed by moving its next probe time
                                          with a conditional update: one replica wins
webhook-headers     every worker, once    sealing a stored row twice is harmless
webhooks            every worker [1]      ``FOR UPDATE SKIP LOCKED`` claims with a lease
webhook-records     with ``webhooks``     records the results of this process's own sends
operations          every worker [2]      ``SKIP LOCKED`` claims with a renewed lease
==================  ====================  =================================================

[1] unless ``TP_WEBHOOK_DISPATCH=false``; [2] unless ``TP_RUN_OPERATIONS=false``.

A future loop that must run once per deployment takes a PostgreSQL advisory lock (see
DESIGN.md), never "worker 0 only": worker 0 dies and restarts, and other hosts run their
own worker 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from server import keys
from server.settings import Settings, SettingsError

log = logging.getLogger("tunnelplane.supervisor")

#: Seconds a stopping worker gets beyond the grace (closing pools, flushing counters).
STOP_MARGIN = 10.0


def missing_backends(settings: Settings) -> list[str]:
    """What more than one worker needs and ``settings`` lack: the settings to set, each
    with why."""
    missing = []
    scheme = settings.effective_database_url.partition(":")[0]
    if scheme.partition("+")[0] != "postgresql":
        missing.append("TP_DATABASE_URL to a PostgreSQL database (SQLite is one process's file)")
    if not settings.redis_url:
        missing.append(
            "TP_REDIS_URL (without Redis, rate limits, revocations, caches and watch "
            "streams stay inside each process)"
        )
    return missing


def check_shared_backends(settings: Settings) -> None:
    """Raise :class:`SettingsError` naming every missing shared backend, unless one worker."""
    missing = missing_backends(settings) if settings.workers > 1 else []
    if missing:
        raise SettingsError(
            f"TP_WORKERS={settings.workers} runs {settings.workers} processes that share "
            "their state through PostgreSQL and Redis; set " + " and ".join(missing)
        )


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound (not listening) to ``host:port`` with ``SO_REUSEPORT``: it picks the
    port when ``port`` is 0, and keeps it while the workers listen on it."""
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR as every server sets it: a restart must not wait for the previous
        # process's connections in TIME_WAIT on this port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((bare, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return sock


@dataclass(frozen=True, slots=True)
class Ports:
    """Where the workers listen: one gRPC and one HTTP port for all (-1: no HTTP), and the
    first metrics port (worker ``i`` uses ``metrics + i``; 0: any; -1: none)."""

    grpc: int
    http: int
    metrics: int

    def metrics_of(self, index: int) -> int:
        """The metrics port of worker ``index``."""
        return self.metrics + index if self.metrics > 0 else self.metrics


def worker_cpu(index: int, cpus: set[int]) -> int:
    """The CPU of worker ``index`` under ``TP_WORKER_CPU_AFFINITY=auto``: the ``index``-th
    of the CPUs the group may use, wrapping around when there are more workers than CPUs."""
    ordered = sorted(cpus)
    return ordered[index % len(ordered)]


def pin_to_cpu(cpu: int) -> None:
    """Run every thread of this process, and every thread it starts later (they inherit
    the mask), on ``cpu``."""
    for task in Path("/proc/self/task").iterdir():
        os.sched_setaffinity(int(task.name), {cpu})


def worker_environment(settings: Settings, ports: Ports, index: int) -> dict[str, str]:
    """The settings a worker gets on top of the supervisor's environment."""
    env = {
        "TP_WORKERS": str(settings.workers),
        "TP_GRPC_PORT": str(ports.grpc),
        "TP_HTTP_PORT": str(ports.http),
        "TP_METRICS_PORT": str(ports.metrics_of(index)),
    }
    if settings.password_hash_concurrency == 0:
        cpus = len(os.sched_getaffinity(0))
        env["TP_PASSWORD_HASH_CONCURRENCY"] = str(max(1, cpus // settings.workers))
    return env


class SupervisorLink:
    """A worker's end of its control socket: it says when the worker serves, and tells
    the worker when the supervisor has gone."""

    def __init__(self, fd: int) -> None:
        self._sock = socket.socket(fileno=fd)
        self._sock.setblocking(False)  # noqa: FBT003 - the socket API

    def on_gone(self, gone: Callable[[], None]) -> None:
        """Call ``gone`` once the supervisor's end closes (the supervisor died)."""
        loop = asyncio.get_running_loop()
        fd = self._sock.fileno()

        def readable() -> None:
            try:
                data = self._sock.recv(64)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(fd)
                gone()

        loop.add_reader(fd, readable)

    async def serving(self, metrics_port: int) -> None:
        """Tell the supervisor this worker serves."""
        line = json.dumps({"pid": os.getpid(), "metrics_port": metrics_port}) + "\n"
        await asyncio.get_running_loop().sock_sendall(self._sock, line.encode())


@dataclass
class _Worker:
    """One running worker, as the supervisor sees it."""

    index: int
    process: asyncio.subprocess.Process
    control: socket.socket
    exited: asyncio.Task[int]
    metrics_port: int = -1
    writer: asyncio.StreamWriter | None = field(default=None, repr=False)

    @property
    def facts(self) -> dict[str, object]:
        """Which worker, for the supervisor's log lines."""
        return {"worker_index": self.index, "worker_pid": self.process.pid}

    async def until_serving(self) -> bool:
        """Wait for the worker's "serving" line; False if it exited first. (The supervisor
        keeps its end open from then on: the worker stops when it closes.)"""
        reader, self.writer = await asyncio.open_connection(sock=self.control)
        line = await reader.readline()
        if not line:
            await self.exited
            return False
        self.metrics_port = int(json.loads(line)["metrics_port"])
        return True

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the worker, if it still runs."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)

    def close(self) -> None:
        """Close the supervisor's end of the control socket."""
        if self.writer is not None:
            self.writer.close()
        else:
            self.control.close()


class ProcessGroup:
    """The supervisor: starts the workers, replaces one that dies, stops them all."""

    def __init__(
        self,
        settings: Settings,
        ports: Ports,
        *,
        command: Sequence[str] = (sys.executable, "-m", "server", "serve"),
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._settings = settings
        self._ports = ports
        self._command = tuple(command)
        self._environ = dict(os.environ if environ is None else environ)
        self._workers: dict[int, _Worker] = {}
        self._failed = False

    async def run(self, stop: asyncio.Event) -> int:
        """Serve until ``stop`` is set or a worker cannot start; the exit status."""
        try:
            if await self._start_all(stop):
                self._say_serving()
                await self._supervise(stop)
        finally:
            clean = await self._stop_all()
        return 0 if clean and not self._failed else 1

    async def _spawn(self, index: int) -> _Worker:
        mine, theirs = socket.socketpair()
        env = self._environ | worker_environment(self._settings, self._ports, index)
        try:
            process = await asyncio.create_subprocess_exec(
                *self._command,
                "--worker-index",
                str(index),
                "--control-fd",
                str(theirs.fileno()),
                env=env,
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
            )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        exited = asyncio.create_task(process.wait(), name=f"worker-{index}")
        worker = _Worker(index, process, mine, exited)
        self._workers[index] = worker
        return worker

    async def _start(self, index: int, stop: asyncio.Event) -> bool:
        """Start worker ``index`` and wait until it serves; False if it failed (or
        ``stop`` was set meanwhile)."""
        worker = await self._spawn(index)
        starting = asyncio.ensure_future(worker.until_serving())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not starting.done():
                starting.cancel()  # takes effect later: the task is not done yet either
        if not starting.done():
            return False
        if not starting.result():
            log.error(
                "a worker failed to start",
                extra=worker.facts | {"exit_code": worker.process.returncode},
            )
            self._failed = True
            return False
        return True

    async def _start_all(self, stop: asyncio.Event) -> bool:
        """Start every worker at once; True when all of them serve, False as soon as one
        fails (or ``stop`` is set)."""
        log.info(
            "starting workers",
            extra={
                "workers": self._settings.workers,
                "grpc_port": self._ports.grpc,
                "http_port": self._ports.http,
            },
        )
        starts = [
            asyncio.ensure_future(self._start(i, stop)) for i in range(self._settings.workers)
        ]
        try:
            for started in asyncio.as_completed(starts):
                if not await started:
                    return False
            return True
        finally:
            for start in starts:
                start.cancel()
            await asyncio.gather(*starts, return_exceptions=True)

    def _say_serving(self) -> None:
        workers = sorted(self._workers.values(), key=lambda w: w.index)
        log.info(
            "serving",
            extra={
                "grpc_port": self._ports.grpc,
                "http_port": self._ports.http,
                "metrics_ports": [w.metrics_port for w in workers],
                "workers": len(workers),
                "worker_pids": [w.process.pid for w in workers],
                "mode": self._settings.mode,
            },
        )

    async def _supervise(self, stop: asyncio.Event) -> None:
        """Replace workers that die until ``stop`` is set, every worker has been told to
        stop, or a replacement fails to start."""
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while self._workers and not stop.is_set():
                exits = {w.exited: w for w in self._workers.values()}
                done, _ = await asyncio.wait(
                    {stopping, *exits}, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done - {stopping}:
                    if not await self._replace(exits[task], stop):
                        return
        finally:
            stopping.cancel()

    async def _replace(self, worker: _Worker, stop: asyncio.Event) -> bool:
        """A worker exited: start another unless it was told to stop; False when the group
        must stop."""
        if stop.is_set():
            return False  # the group stops: its exit status counts there
        del self._workers[worker.index]
        worker.close()
        code = worker.process.returncode
        facts = worker.facts | {"exit_code": code}
        if code == 0:
            log.warning("a worker stopped on its own; not replaced", extra=facts)
            return True
        log.error("a worker died; starting another", extra=facts)
        if not await self._start(worker.index, stop):
            return False
        log.info("a worker replaced", extra=self._workers[worker.index].facts)
        return True

    async def _stop_all(self) -> bool:
        """SIGTERM every worker, wait (the grace and :data:`STOP_MARGIN`), kill the late
        ones; True if every worker stopped as told."""
        grace = self._settings.shutdown_grace
        log.info("shutting down", extra={"grace_seconds": grace})
        workers = list(self._workers.values())
        for worker in workers:
            worker.signal(signal.SIGTERM)
        exits = [w.exited for w in workers]
        if exits:
            _, late = await asyncio.wait(exits, timeout=grace + STOP_MARGIN)
            for worker in workers:
                if worker.exited in late:
                    log.error("a worker did not stop in time; killed", extra=worker.facts)
                    worker.signal(signal.SIGKILL)
            await asyncio.gather(*exits)
        for worker in workers:
            worker.close()
        codes = [w.process.returncode for w in workers]
        log.info("stopped", extra={"exit_codes": codes})
        # A worker still starting has no handler yet: SIGTERM ends it, as it was told.
        return all(code in {0, -signal.SIGTERM} for code in codes)


async def supervise(settings: Settings) -> int:
    """Run ``settings.workers`` workers until SIGTERM or SIGINT; the exit status."""
    # Workers starting together would race to generate development keys in the data
    # directory (each its own): generate them here, once, before any starts.
    keys.load(settings)
    try:
        grpc_socket = reserve_port(settings.grpc_host, settings.grpc_port)
        http_socket = (
            reserve_port(settings.http_host, settings.http_port)
            if settings.http_port >= 0
            else None
        )
    except OSError as exc:
        log.error("not serving: %s", exc.strerror)  # noqa: TRY400 - no traceback for a busy port
        return 1
    ports = Ports(
        grpc=grpc_socket.getsockname()[1],
        http=http_socket.getsockname()[1] if http_socket is not None else -1,
        metrics=settings.metrics_port,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        return await ProcessGroup(settings, ports).run(stop)
    finally:
        grpc_socket.close()
        if http_socket is not None:
            http_socket.close()
