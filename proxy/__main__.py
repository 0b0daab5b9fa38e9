"""Command line: ``python -m proxy --control-plane HOST:PORT``.

Each option falls back to a ``TP_PROXY_*`` environment variable (the control plane sets
them when it runs an embedded proxy). SIGTERM or SIGINT stops the proxy cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from proxy.app import ProxyApp, ProxySettings
from proxy.web import WebSettings
from server import logs
from tplink.loop import run

log = logging.getLogger("tunnelplane.proxy")


def _env(name: str, default: str) -> str:
    return os.environ.get(f"TP_PROXY_{name}", default)


def parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(
        prog="python -m proxy",
        description="Carry web requests to tunnels' local services through their agents.",
    )
    p.add_argument("--control-plane", default=_env("CONTROL_PLANE", "127.0.0.1:50051"),
                   metavar="HOST:PORT")  # fmt: skip
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="public address to bind")
    p.add_argument("--port", type=int, default=int(_env("PORT", "8090")), help="public port")
    p.add_argument("--link-host", default=_env("LINK_HOST", "127.0.0.1"))
    p.add_argument("--link-port", type=int, default=int(_env("LINK_PORT", "8091")),
                   help="port agents link to")  # fmt: skip
    p.add_argument("--metrics-port", type=int, default=int(_env("METRICS_PORT", "0")))
    p.add_argument("--admin-port", type=int, default=int(_env("ADMIN_PORT", "0")),
                   help="admin port (0: a free one); runs with TP_PROXY_ADMIN_TOKEN")  # fmt: skip
    p.add_argument("--owner", default=_env("OWNER", ""),
                   help="serve only this user's tunnels (a user id)")  # fmt: skip
    p.add_argument("--public-domain", default=os.environ.get("TP_PUBLIC_DOMAIN", "localhost"))
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain of the public side")
    p.add_argument("--tls-key", type=Path, help="PEM private key of the public side")
    p.add_argument("--link-tls-cert", type=Path, help="PEM certificate chain of the link")
    p.add_argument("--link-tls-key", type=Path, help="PEM private key of the link")
    ca = _env("CONTROL_PLANE_CA", "")
    p.add_argument("--control-plane-ca", type=Path, default=Path(ca) if ca else None,
                   help="PEM roots to verify the control plane with (implies TLS)")  # fmt: skip
    p.add_argument("--first-byte-timeout", type=float,
                   default=float(_env("FIRST_BYTE_TIMEOUT", "300")))  # fmt: skip
    p.add_argument("--idle-timeout", type=float, default=float(_env("IDLE_TIMEOUT", "30")))
    p.add_argument("--max-body-bytes", type=int, default=int(_env("MAX_BODY_BYTES", str(1 << 30))))
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"),
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])  # fmt: skip
    p.add_argument("--log-format", default=_env("LOG_FORMAT", "json"), choices=["json", "text"])
    return p


def settings_from(args: argparse.Namespace) -> ProxySettings:
    """The proxy's settings; ValueError when the arguments cannot work."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if (args.link_tls_cert is None) != (args.link_tls_key is None):
        raise ValueError("--link-tls-cert and --link-tls-key go together")
    if args.first_byte_timeout <= 0 or args.idle_timeout <= 0 or args.max_body_bytes <= 0:
        raise ValueError("timeouts and --max-body-bytes must be positive")
    roots = args.control_plane_ca.read_bytes() if args.control_plane_ca else None
    token = _env("ADMIN_TOKEN", "")
    if token and len(token) < 16:
        raise ValueError("TP_PROXY_ADMIN_TOKEN must be 16 characters or more")
    config = json.loads(_env("CONFIG", "null"))
    if config is not None and not isinstance(config, dict):
        raise ValueError("TP_PROXY_CONFIG must be a JSON object")
    return ProxySettings(
        control_plane=args.control_plane,
        host=args.host,
        port=args.port,
        link_host=args.link_host,
        link_port=args.link_port,
        metrics_port=args.metrics_port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        link_tls_cert=args.link_tls_cert,
        link_tls_key=args.link_tls_key,
        control_plane_roots=roots,
        web=WebSettings(
            public_domain=args.public_domain,
            first_byte_timeout=args.first_byte_timeout,
            idle_timeout=args.idle_timeout,
            max_body_bytes=args.max_body_bytes,
            owner=args.owner,
        ),
        admin_port=args.admin_port,
        admin_token=token,
        config=config,
        config_version=int(_env("CONFIG_VERSION", "0")),
        peers_redis_url=_env("REDIS_URL", ""),
        peers_prefix=_env("REDIS_PREFIX", "tp:"),
        advertise_url=_env("ADVERTISE_URL", ""),
    )


async def serve(settings: ProxySettings) -> int:
    """Run until SIGTERM or SIGINT; return the exit status."""
    app = ProxyApp(settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await app.start()
    except OSError as exc:
        log.error("cannot listen", extra={"error": str(exc)})  # noqa: TRY400 - no traceback
        await app.stop()
        return 1
    ports = f"port={app.port} link_port={app.link_port} admin_port={app.admin_port}"
    print(f"proxy ready {ports}", flush=True)
    watchdog = asyncio.create_task(_orphaned(int(_env("PARENT_PID", "0")), stopping))
    await stopping.wait()
    watchdog.cancel()
    await app.stop()
    log.info("proxy stopped")
    return 0


async def _orphaned(parent: int, stopping: asyncio.Event) -> None:
    """An embedded proxy (``TP_PROXY_PARENT_PID``) stops when its server is gone, even if
    the server could not stop it (SIGKILL): no orphan keeps the ports."""
    if not parent:
        return
    while os.getppid() == parent:  # noqa: ASYNC110 - no event tells of a parent's death
        await asyncio.sleep(1.0)
    log.warning("the server that started this proxy is gone; stopping")
    stopping.set()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format, {"component": "proxy"})
    try:
        settings = settings_from(args)
    except (ValueError, OSError) as exc:
        log.error("cannot start: %s", exc)  # noqa: TRY400
        return 2
    return run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
