"""A test-double control plane for the proxy's own tests: a real grpc.aio server on
loopback implementing ProxyService with decisions the test sets. The real control plane's
decisions are tested in tests/integration/test_tunnel_access.py and end to end in
tests/proxy/test_processes.py."""

from __future__ import annotations

import grpc
from google.protobuf import duration_pb2
from tunnelplane.v1 import proxies_pb2, proxies_pb2_grpc

Decision = proxies_pb2.TunnelAccessDecision
KEY = "tp_agentkey"
TOKEN = "good-token"
#: The user name and password of the tunnels in mode "basic".
BASIC_USER, BASIC_PASSWORD = "zoë", "crème brûlée"


class FakePlane(proxies_pb2_grpc.ProxyServiceServicer):
    """Tunnels by id -> (name, mode); the agent key KEY links to any of them. Each check's
    request and ``authorization`` metadata are kept, for tests to see what was sent."""

    def __init__(self) -> None:
        self.tunnels: dict[str, tuple[str, str]] = {}
        self.checks = 0
        self.seen: list[tuple[proxies_pb2.CheckTunnelAccessRequest, str]] = []
        self._server = grpc.aio.server()
        proxies_pb2_grpc.add_ProxyServiceServicer_to_server(self, self._server)
        self.port = 0

    async def start(self) -> FakePlane:
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return self

    async def stop(self) -> None:
        await self._server.stop(0)

    async def CheckTunnelAccess(self, request, context):  # noqa: N802
        self.checks += 1
        auth = dict(context.invocation_metadata()).get("authorization", "")
        self.seen.append((request, auth))
        if auth and auth != f"Bearer {TOKEN}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad credential")
        found = self.tunnels.get(request.tunnel_id)
        keep = duration_pb2.Duration(seconds=5)
        if found is None:
            return Decision(refusal=Decision.REFUSAL_NOT_FOUND, cache_for=keep)
        name, mode = found
        if mode == "basic":
            given = (request.basic_username, request.basic_password)
            if given != (BASIC_USER, BASIC_PASSWORD):
                refusal = Decision.REFUSAL_UNAUTHENTICATED
                return Decision(refusal=refusal, cache_for=keep, basic_auth=True)
            return Decision(allowed=True, tunnel=name, cache_for=keep, basic_auth=True)
        if mode == "private" and not auth:
            return Decision(refusal=Decision.REFUSAL_UNAUTHENTICATED, tunnel=name, cache_for=keep)
        if mode == "stopped":
            return Decision(refusal=Decision.REFUSAL_NOT_RUNNING, tunnel=name, cache_for=keep)
        return Decision(allowed=True, tunnel=name, cache_for=keep)

    async def AuthorizeAgentLink(self, request, context):  # noqa: N802
        auth = dict(context.invocation_metadata()).get("authorization", "")
        if auth != f"Bearer {KEY}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad key")
        if request.tunnel not in {name for name, _ in self.tunnels.values()}:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such tunnel")
        return proxies_pb2.AgentLinkGrant(
            tunnel=request.tunnel, cache_for=duration_pb2.Duration(seconds=30)
        )
