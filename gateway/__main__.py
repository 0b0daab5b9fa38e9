"""Standalone gateway: ``python -m gateway --descriptor-set F --upstream HOST:PORT --port N``.

Serves every annotated service in the descriptor set, forwarding each call to the gRPC
upstream over a grpc.aio channel; with ``--otel-exporter``, each upstream call is a client
span that continues the HTTP caller's ``traceparent`` (see :mod:`gateway.telemetry`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

import grpc
from opentelemetry.sdk.trace import TracerProvider

from gateway.app import Gateway, GatewayOptions
from gateway.bindings import BindingError, Catalog, load_descriptor_set
from gateway.forward import ChannelDispatcher
from gateway.guard import ConnectionGuard
from gateway.serve import HttpServer
from gateway.telemetry import EXPORTERS, client_interceptors, tracer_provider

log = logging.getLogger("gateway")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    parser.add_argument(
        "--descriptor-set",
        required=True,
        type=Path,
        help="FileDescriptorSet built with --include_imports (and source info)",
    )
    parser.add_argument("--upstream", required=True, help="gRPC server, HOST:PORT")
    parser.add_argument("--port", type=int, required=True, help="HTTP port (0: any free one)")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP address to bind")
    parser.add_argument("--service", action="append", help="serve only this service (repeat)")
    parser.add_argument("--upstream-tls", action="store_true", help="TLS to the upstream")
    parser.add_argument("--upstream-ca", type=Path, help="PEM roots to verify the upstream")
    parser.add_argument("--upstream-authority", help="override the :authority / TLS name")
    parser.add_argument("--tls-cert", default="", help="PEM certificate for HTTPS")
    parser.add_argument("--tls-key", default="", help="PEM key for HTTPS")
    parser.add_argument(
        "--strict", action="store_true", help="reject unknown query parameters and body fields"
    )
    parser.add_argument("--max-body-bytes", type=int, default=2 * 1024 * 1024)
    parser.add_argument(
        "--default-timeout",
        type=float,
        default=30.0,
        help="deadline (s) of unary calls that send no Grpc-Timeout (streams get none)",
    )
    parser.add_argument(
        "--sse-keepalive",
        type=float,
        default=15.0,
        help="seconds between ': keep-alive' comments on an idle SSE stream (0: none)",
    )
    parser.add_argument(
        "--sse-id-field",
        default="event_id",
        help="string field of streamed messages sent as the SSE id ('' for none)",
    )
    parser.add_argument(
        "--header-timeout", type=float, default=10.0, help="seconds to send request headers"
    )
    parser.add_argument(
        "--body-timeout", type=float, default=30.0, help="longest pause in a request body, s"
    )
    parser.add_argument(
        "--max-connections-per-address",
        type=int,
        default=100,
        help="open connections one client address may hold (0: no cap)",
    )
    parser.add_argument(
        "--cors-origin", action="append", default=[], help="allowed CORS origin (repeat; * for any)"
    )
    parser.add_argument(
        "--omit-defaults", action="store_true", help="leave zero values out of JSON responses"
    )
    parser.add_argument(
        "--trust-forwarded-proto",
        action="store_true",
        help="believe X-Forwarded-Proto: https (behind a TLS proxy)",
    )
    parser.add_argument("--title", default="API", help="OpenAPI title")
    parser.add_argument("--no-docs", action="store_true", help="do not serve /api/docs")
    parser.add_argument(
        "--otel-exporter",
        choices=EXPORTERS,
        default="none",
        help="where client spans of upstream calls go (none: no spans; a caller's "
        "traceparent still reaches the upstream)",
    )
    parser.add_argument("--otel-endpoint", default="", help="OTLP gRPC collector, HOST:PORT")
    args = parser.parse_args(argv)
    if args.otel_exporter == "otlp" and not args.otel_endpoint:
        parser.error("--otel-endpoint is required with --otel-exporter otlp")
    return args


def make_channel(
    args: argparse.Namespace, interceptors: list[grpc.aio.ClientInterceptor] | None = None
) -> grpc.aio.Channel:
    """The channel to the upstream."""
    options = []
    if args.upstream_authority:
        options.append(("grpc.default_authority", args.upstream_authority))
        options.append(("grpc.ssl_target_name_override", args.upstream_authority))
    if args.upstream_tls or args.upstream_ca:
        roots = args.upstream_ca.read_bytes() if args.upstream_ca else None
        credentials = grpc.ssl_channel_credentials(root_certificates=roots)
        return grpc.aio.secure_channel(
            args.upstream, credentials, options=options, interceptors=interceptors
        )
    return grpc.aio.insecure_channel(args.upstream, options=options, interceptors=interceptors)


async def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT."""
    files = load_descriptor_set(args.descriptor_set)
    catalog = Catalog.build(files, services=args.service)
    if not catalog.bindings:
        log.error("no service in the descriptor set has google.api.http rules")
        return 2
    options = GatewayOptions(
        strict=args.strict,
        max_body_bytes=args.max_body_bytes,
        emit_defaults=not args.omit_defaults,
        cors_origins=frozenset(args.cors_origin),
        docs=not args.no_docs,
        title=args.title,
        tls=bool(args.tls_cert),
        trust_forwarded_proto=args.trust_forwarded_proto,
        default_timeout=args.default_timeout,
        sse_keepalive=args.sse_keepalive or None,
        sse_id_field=args.sse_id_field,
    )
    guard = ConnectionGuard(
        header_timeout=args.header_timeout or None,
        body_timeout=args.body_timeout or None,
        max_per_address=args.max_connections_per_address,
    )
    provider = tracer_provider(args.otel_exporter, args.otel_endpoint, "gateway")
    try:
        await _serve(args, catalog, options, guard, provider)
    finally:
        if provider is not None:
            provider.shutdown()  # sends the spans still buffered
    return 0


async def _serve(
    args: argparse.Namespace,
    catalog: Catalog,
    options: GatewayOptions,
    guard: ConnectionGuard,
    provider: TracerProvider | None,
) -> None:
    async with make_channel(args, client_interceptors(provider)) as channel:
        dispatcher = ChannelDispatcher(channel, traced=provider is not None)
        app = Gateway(catalog, dispatcher, options)
        server = HttpServer(
            app, args.host, args.port, certfile=args.tls_cert, keyfile=args.tls_key, guard=guard
        )
        await server.start()
        log.info(
            "gateway listening on %s:%d for %s",
            args.host,
            server.port,
            args.upstream,
            extra={"port": server.port, "routes": len(catalog.bindings)},
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        return asyncio.run(run(args))
    except (BindingError, OSError) as exc:
        log.error("%s", exc)  # noqa: TRY400 - a clear message, not a traceback, for bad input
        return 2


if __name__ == "__main__":
    sys.exit(main())
