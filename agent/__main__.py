"""Command line: ``python -m agent --control-plane HOST:PORT --tunnel users/U/tunnels/T``.

The agent key comes from the environment variable ``TP_AGENT_KEY`` only, so that it never
shows in a process list or a log. ``--otel-exporter`` traces the control link (see
:mod:`agent.telemetry`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc

from agent import __version__, logs, telemetry
from agent.identity import resolve_agent_id
from agent.relay import parse_address
from agent.session import Session, SessionSettings
from tplink.loop import run

log = logging.getLogger("tunnelplane.agent")

KEY_VARIABLE = "TP_AGENT_KEY"
TUNNEL = re.compile(r"users/[^/]+/tunnels/[^/]+")


class UsageError(Exception):
    """The command line or environment cannot work; exit status 2."""


def parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(
        prog="python -m agent",
        description="Carry a Tunnelplane tunnel's TCP traffic to a local service. "
        f"The agent key is read from ${KEY_VARIABLE}.",
    )
    p.add_argument("--control-plane", required=True, metavar="HOST:PORT")
    p.add_argument("--tunnel", required=True, metavar="users/U/tunnels/T")
    p.add_argument(
        "--agent-id",
        help="stable id (default: ~/.config/tunnelplane/agent-id, "
        "else derived from the host name and tunnel)",
    )
    p.add_argument(
        "--target",
        default="",
        metavar="HOST:PORT",
        help="where to relay when the control plane names no target",
    )
    p.add_argument("--listen-host", help="listen on this host instead of the one sent")
    p.add_argument("--tls", action="store_true", help="connect to the control plane over TLS")
    p.add_argument("--ca-file", type=Path, help="PEM roots to trust (implies --tls)")
    p.add_argument(
        "--link-ca-file",
        type=Path,
        help="PEM roots to verify streaming proxies' links with (TLS on the links)",
    )
    p.add_argument("--heartbeat", type=float, default=15.0, metavar="SECONDS")
    p.add_argument("--report-interval", type=float, default=10.0, metavar="SECONDS")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument(
        "--otel-exporter",
        choices=telemetry.EXPORTERS,
        default="none",
        help="where spans of control-plane calls go (none: no spans, no traceparent sent)",
    )
    p.add_argument("--otel-endpoint", default="", metavar="HOST:PORT", help="OTLP collector")
    p.add_argument("--version", action="version", version=__version__)
    return p


def settings_from(args: argparse.Namespace, key: str) -> SessionSettings:
    """Check the arguments and build the session's settings; UsageError when unusable."""
    if not key:
        raise UsageError(f"set the agent key in ${KEY_VARIABLE}")
    if not TUNNEL.fullmatch(args.tunnel):
        raise UsageError(f"--tunnel must be users/U/tunnels/T, not {args.tunnel!r}")
    if args.heartbeat <= 0 or args.report_interval <= 0:
        raise UsageError("--heartbeat and --report-interval must be positive")
    if args.otel_exporter == "otlp" and not args.otel_endpoint:
        raise UsageError("--otel-endpoint is required with --otel-exporter otlp")
    try:
        for address in filter(None, (args.control_plane, args.target)):
            parse_address(address)
        agent_id = resolve_agent_id(args.agent_id, args.tunnel)
        roots = args.ca_file.read_bytes() if args.ca_file else None
        link_roots = args.link_ca_file.read_bytes() if args.link_ca_file else None
    except (ValueError, OSError) as exc:
        raise UsageError(str(exc)) from exc
    return SessionSettings(
        control_plane=args.control_plane,
        tunnel=args.tunnel,
        agent_id=agent_id,
        key=key,
        default_target=args.target,
        listen_host=args.listen_host,
        tls=args.tls or roots is not None,
        root_certificates=roots,
        link_root_certificates=link_roots,
        heartbeat_interval=args.heartbeat,
        report_interval=args.report_interval,
    )


async def serve(
    settings: SessionSettings, interceptors: Sequence[grpc.aio.ClientInterceptor] = ()
) -> int:
    """Run the session until SIGTERM or SIGINT, then close everything; return 0."""
    session = Session(settings, interceptors=interceptors)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, session.stop)
    log.info(
        "agent starting",
        extra={
            "version": __version__,
            "control_plane": settings.control_plane,
            "tunnel": settings.tunnel,
            "agent_id": settings.agent_id,
            "tls": settings.tls,
        },
    )
    await session.run()
    log.info("agent stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = parser().parse_args(argv)
    logs.configure(args.log_level)
    try:
        settings = settings_from(args, os.environ.get(KEY_VARIABLE, ""))
    except UsageError as exc:
        log.error("cannot start", extra={"reason": str(exc)})  # noqa: TRY400 - no traceback
        return 2
    provider = telemetry.tracer_provider(args.otel_exporter, args.otel_endpoint)
    try:
        return run(serve(settings, telemetry.client_interceptors(provider)))
    finally:
        if provider is not None:
            provider.shutdown()  # sends the spans still buffered


if __name__ == "__main__":
    sys.exit(main())
