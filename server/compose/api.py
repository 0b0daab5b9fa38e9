"""The API: one servicer per service of the contract, and the call pipeline (every stage,
in order) compiled once per method; gRPC and the embedded HTTP gateway serve the same
chains."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from tunnelplane.v1 import (
    admin_pb2,
    agents_pb2,
    audit_pb2,
    auth_pb2,
    events_pb2,
    operations_pb2,
    proxies_pb2,
    tunnels_pb2,
    users_pb2,
    webhooks_pb2,
)

from server.api.admin import AdminApi, Recovery
from server.api.agent_stream import AgentMetrics
from server.api.agents import AgentApi
from server.api.audit import AuditApi
from server.api.auth import AuthApi
from server.api.events import EventApi
from server.api.operations import OperationApi
from server.api.proxies import ProxyApi
from server.api.tunnels import TunnelApi
from server.api.users import UserApi
from server.api.webhooks import WebhookApi
from server.compose.events import EventsArea
from server.compose.health import HealthArea
from server.compose.identity import IdentityArea
from server.compose.infrastructure import Infrastructure
from server.compose.limits import LimitsArea
from server.compose.operations import OperationsArea
from server.compose.proxies import ProxiesArea
from server.compose.tunnels import TunnelsArea
from server.compose.webhooks import WebhooksArea
from server.domain.analytics.service import CallOutcomes
from server.domain.audit.search import AuditSearch
from server.domain.audit.verification import AuditVerifier
from server.interceptors.audit import AuditStage
from server.interceptors.auth import AuthenticateStage, AuthorizeStage
from server.interceptors.context import RequestContextStage
from server.interceptors.deadline import DeadlineStage
from server.interceptors.errors import ErrorStage
from server.interceptors.logging import AccessLogStage
from server.interceptors.metrics import GrpcMetrics, MetricsStage
from server.interceptors.retry import RetryStage
from server.interceptors.streams import StreamLimitStage, StreamRecheckStage
from server.interceptors.tracing import TracingStage
from server.logs import AccessLog
from server.pipeline import Handler, MethodInfo, Pipeline, Stage
from server.policy import load_policies
from server.resilience.control import BreakerReset
from server.settings import networks
from server.workers.aggregates import aggregate_loops
from server.workers.supervisor import Loop

log = logging.getLogger("tunnelplane.server")

#: Every service this server implements, from the contract.
SERVICES: Sequence[ServiceDescriptor] = (
    auth_pb2.DESCRIPTOR.services_by_name["AuthService"],
    users_pb2.DESCRIPTOR.services_by_name["UserService"],
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"],
    audit_pb2.DESCRIPTOR.services_by_name["AuditService"],
    tunnels_pb2.DESCRIPTOR.services_by_name["TunnelService"],
    agents_pb2.DESCRIPTOR.services_by_name["AgentService"],
    events_pb2.DESCRIPTOR.services_by_name["EventService"],
    webhooks_pb2.DESCRIPTOR.services_by_name["WebhookService"],
    operations_pb2.DESCRIPTOR.services_by_name["OperationService"],
    proxies_pb2.DESCRIPTOR.services_by_name["ProxyService"],
)


@dataclass
class Areas:
    """The domain areas the API serves."""

    identity: IdentityArea
    limits: LimitsArea
    events: EventsArea
    tunnels: TunnelsArea
    webhooks: WebhooksArea
    operations: OperationsArea
    health: HealthArea
    proxies: ProxiesArea


@dataclass
class ApiArea:
    """The compiled chains, by full method name, and the parts the root drives."""

    methods: list[MethodInfo]
    chains: dict[str, Handler]
    agents: AgentApi
    stream_limits: StreamLimitStage
    #: Every call's outcome, for error analytics.
    outcomes: CallOutcomes
    flush_interval: float

    def loops(self) -> Sequence[Loop]:
        """The outcome counts' flushes and pruning."""
        outcomes = self.outcomes
        return aggregate_loops("call-outcomes", outcomes.flush, outcomes.prune, self.flush_interval)

    async def aclose(self) -> None:
        """Nothing to release."""


def build(infra: Infrastructure, areas: Areas, stopping: Callable[[], bool]) -> ApiArea:
    """Servicers over ``areas``, behind the pipeline; ``stopping`` says when the server
    is shutting down (agents that leave then are not counted as gone)."""
    agents = AgentApi(
        areas.tunnels.agents,
        areas.tunnels.tunnels,
        stopping,
        areas.identity.credentials.recheck,
        AgentMetrics(infra.registry),
        areas.proxies.fleet.links,
    )
    stream_limits = StreamLimitStage(areas.identity.tiers, infra.registry)
    outcomes = CallOutcomes(infra.db, infra.clock)
    pipeline = Pipeline(_stages(infra, areas, stream_limits, outcomes))
    servicers = _servicers(infra, areas, agents, outcomes)
    methods = method_table(SERVICES)
    chains = {m.full_name: pipeline.build(m, _endpoint(servicers, m)) for m in methods}
    interval = infra.settings.violation_flush_interval
    return ApiArea(methods, chains, agents, stream_limits, outcomes, interval)


def _servicers(
    infra: Infrastructure, areas: Areas, agents: AgentApi, outcomes: CallOutcomes
) -> dict[str, object]:
    identity, tunnels, limits, clock = areas.identity, areas.tunnels, areas.limits, infra.clock
    audit = AuditSearch(infra.db, infra.lister, clock)
    return {
        "tunnelplane.v1.AuthService": AuthApi(
            identity.accounts, identity.api_keys, identity.tokens, clock
        ),
        "tunnelplane.v1.UserService": UserApi(
            identity.users, identity.suspensions, identity.tiers, limits.quotas, clock, audit
        ),
        "tunnelplane.v1.TunnelService": TunnelApi(
            tunnels.tunnels,
            tunnels.shares,
            tunnels.agents,
            identity.users,
            clock,
            identity.credentials.recheck,
            areas.events.log,
        ),
        "tunnelplane.v1.AgentService": agents,
        "tunnelplane.v1.EventService": EventApi(areas.events.log),
        "tunnelplane.v1.WebhookService": WebhookApi(areas.webhooks.webhooks),
        "tunnelplane.v1.OperationService": OperationApi(areas.operations.operations, clock),
        "tunnelplane.v1.ProxyService": ProxyApi(
            areas.proxies.access,
            areas.proxies.fleet,
            areas.proxies.insight,
            areas.events.log,
            identity.credentials.recheck,
        ),
        "tunnelplane.v1.AdminService": AdminApi(
            areas.health.status,
            limits.limiter,
            limits.violations,
            infra.lister,
            limits.blocks,
            BreakerReset(infra.breakers, infra.db, infra.clock),
            outcomes,
            Recovery(areas.operations.operations, tunnels.agents, infra.clock),
        ),
        "tunnelplane.v1.AuditService": AuditApi(audit, AuditVerifier(infra.db, infra.clock)),
    }


def _stages(
    infra: Infrastructure,
    areas: Areas,
    stream_limits: StreamLimitStage,
    outcomes: CallOutcomes,
) -> list[Stage]:
    """Every stage, in the order a call passes them (DESIGN.md, "Request flow")."""
    settings, credentials = infra.settings, areas.identity.credentials
    rate_limit = areas.limits.stage
    return [
        RequestContextStage(networks(settings.trusted_proxies)),
        AccessLogStage(
            AccessLog(
                logging.getLogger("tunnelplane.access"), json_lines=settings.log_format == "json"
            )
        ),
        MetricsStage(GrpcMetrics(infra.registry), outcomes),
        TracingStage(
            infra.tracer_provider.get_tracer("tunnelplane.server"),
            enabled=settings.otel_exporter != "none",
        ),
        DeadlineStage(settings.default_deadline),
        AuthenticateStage(credentials),
        AuditStage(infra.db, infra.clock, log),  # after authentication: names the caller
        *([rate_limit] if rate_limit is not None else []),
        AuthorizeStage(tls_required=settings.mode == "production", shares=areas.tunnels.shares),
        stream_limits,
        StreamRecheckStage(
            credentials.recheck,
            settings.stream_recheck_interval,
            logging.getLogger("tunnelplane.streams"),
            infra.registry,
        ),
        RetryStage(infra.registry),
        ErrorStage(log, infra.errors),
    ]


def grpc_type(method: MethodDescriptor) -> str:
    """``unary``, ``client_stream``, ``server_stream`` or ``bidi_stream``."""
    return {
        (False, False): "unary",
        (True, False): "client_stream",
        (False, True): "server_stream",
        (True, True): "bidi_stream",
    }[(method.client_streaming, method.server_streaming)]


def method_table(services: Sequence[ServiceDescriptor]) -> list[MethodInfo]:
    """Every method of ``services`` with its policy; fails if any policy is missing."""
    descriptors = [m for service in services for m in service.methods]
    policies = load_policies(descriptors)
    return [
        MethodInfo(
            full_name=f"/{m.containing_service.full_name}/{m.name}",
            service=m.containing_service.full_name,
            name=m.name,
            grpc_type=grpc_type(m),
            request_type=message_factory.GetMessageClass(m.input_type),
            response_type=message_factory.GetMessageClass(m.output_type),
            policy=policies[m.full_name],
            descriptor=m,
        )
        for m in descriptors
    ]


def _endpoint(servicers: dict[str, object], method: MethodInfo) -> Handler:
    servicer = servicers.get(method.service)
    handler: Callable[..., Any] | None = getattr(servicer, method.name, None)
    if handler is None:
        raise RuntimeError(f"{method.full_name} has no implementation; refusing to start")
    return handler
