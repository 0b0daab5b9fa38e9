"""AdminService."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from google.protobuf import empty_pb2
from tunnelplane.v1 import admin_pb2, operations_pb2

from server.api import convert
from server.api.operations import operation
from server.api.users import caller_id
from server.domain.analytics.model import Tally
from server.domain.analytics.rules import change
from server.domain.analytics.service import CallOutcomes
from server.domain.audit.model import AuditTrail
from server.domain.common.clock import Clock
from server.domain.common.errors import InvalidArgument, NotFound
from server.domain.common.listing import Lister, ListSpec, OrderKey
from server.domain.limits.blocks import IpBlocks
from server.domain.limits.ports import Limiter
from server.domain.limits.service import ViolationLog
from server.domain.operations.model import Operation
from server.domain.operations.rules import operation_parts
from server.domain.operations.service import OperationService
from server.domain.tunnels.agents import AgentSessions
from server.domain.tunnels.rules import tunnel_parts
from server.pipeline import Call
from server.status import Breaker, BreakerControl, StatusSource

MAX_WINDOW = timedelta(days=30)
ERRORS_WINDOW = timedelta(days=7)
BLOCKS_SPEC = ListSpec({}, frozenset({"create_time"}), (OrderKey("create_time", descending=True),))


#: ``kind`` or ``kind.target``: lower-case kind, a target of id characters.
_BREAKER_NAME = re.compile(r"[a-z][a-z-]{0,30}(\.[A-Za-z0-9_-]{1,100})?")
MAX_REASON = 500


def _reason(reason: str) -> None:
    if len(reason) > MAX_REASON:
        raise InvalidArgument.single("reason", f"must be at most {MAX_REASON} characters")


#: ``OperationService.rerun`` or ``.release_lease``.
OperationAction = Callable[[str, str, datetime, str, AuditTrail | None], Awaitable[Operation]]


@dataclass(frozen=True, slots=True)
class Recovery:
    """What the recovery RPCs act on."""

    operations: OperationService
    agents: AgentSessions
    clock: Clock


def _counted(tally: Tally) -> admin_pb2.WindowCount:
    counted = admin_pb2.WindowCount(count=tally.count, previous_count=tally.previous)
    moved = change(tally.count, tally.previous)
    if moved is not None:
        counted.change = moved
    return counted


def _rate(errors: int, calls: int) -> float:
    return errors / calls if calls else 0.0


def _breaker(b: Breaker) -> admin_pb2.CircuitBreaker:
    breaker = admin_pb2.CircuitBreaker(
        name=f"circuitBreakers/{b.name}", kind=b.kind, state=b.state, failures=b.failures
    )
    if b.opened_at is not None:
        opened = convert.timestamp(datetime.fromtimestamp(b.opened_at, UTC))
        if opened is not None:
            breaker.open_time.CopyFrom(opened)
    return breaker


def _time(ms: float) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


class AdminApi:
    """Serves ``tunnelplane.v1.AdminService``."""

    def __init__(
        self,
        status: StatusSource,
        limiter: Limiter,
        violations: ViolationLog,
        lister: Lister,
        blocks: IpBlocks,
        breakers: BreakerControl,
        outcomes: CallOutcomes,
        recovery: Recovery,
    ) -> None:
        self._recovery = recovery
        self._outcomes = outcomes
        self._breakers = breakers
        self._status = status
        self._limiter = limiter
        self._violations = violations
        self._lister = lister
        self._blocks = blocks

    async def GetSystemStatus(
        self, request: admin_pb2.GetSystemStatusRequest, call: Call
    ) -> admin_pb2.SystemStatus:
        now = self._status.status()
        load = now.load
        return admin_pb2.SystemStatus(
            state=now.state,
            dependencies=[
                admin_pb2.DependencyStatus(name=d.name, up=d.up, optional=d.optional, error=d.error)
                for d in now.dependencies
            ],
            limiter_backend=now.limiter_backend,
            load=admin_pb2.LoadStatus(
                in_flight=load.in_flight,
                loop_lag_ms=load.loop_lag_ms,
                level=load.level,
                tier_factors=load.tier_factors,
                shedding=load.shedding,
            ),
            queued_calls=sum(n for _, n in now.queues),
            queues=[admin_pb2.QueueDepth(subject=s, waiting=n) for s, n in now.queues],
            circuit_breakers=[_breaker(b) for b in now.breakers],
        )

    async def SummarizeErrors(
        self, request: admin_pb2.SummarizeErrorsRequest, call: Call
    ) -> admin_pb2.ErrorSummary:
        window = timedelta(hours=1)
        if request.HasField("window"):
            window = convert.from_duration(request.window, "window")
            if not timedelta(minutes=1) <= window <= ERRORS_WINDOW:
                raise InvalidArgument.single("window", "must be between 1 minute and 7 days")
        if not 0 <= request.top <= 100:
            raise InvalidArgument.single("top", "must be between 0 and 100")
        found = await self._outcomes.summarize(window, request.top or 10)
        return admin_pb2.ErrorSummary(
            start_time=convert.timestamp(found.start),
            end_time=convert.timestamp(found.end),
            calls=_counted(found.calls),
            errors=_counted(found.errors),
            error_rate=_rate(found.errors.count, found.calls.count),
            previous_error_rate=_rate(found.errors.previous, found.calls.previous),
            by_category={c.value: _counted(t) for c, t in found.by_category.items()},
            top_errors=[
                admin_pb2.ErrorCount(
                    method=e.method,
                    code=e.code,
                    reason=e.reason,
                    category=e.category.value,
                    count=_counted(e.tally),
                )
                for e in found.top
            ],
        )

    async def RerunOperation(
        self, request: admin_pb2.RerunOperationRequest, call: Call
    ) -> operations_pb2.Operation:
        return await self._recover(request, call, self._recovery.operations.rerun)

    async def ReleaseOperationLease(
        self, request: admin_pb2.ReleaseOperationLeaseRequest, call: Call
    ) -> operations_pb2.Operation:
        return await self._recover(request, call, self._recovery.operations.release_lease)

    async def _recover(
        self,
        request: admin_pb2.RerunOperationRequest | admin_pb2.ReleaseOperationLeaseRequest,
        call: Call,
        action: OperationAction,
    ) -> operations_pb2.Operation:
        _reason(request.reason)
        owner, operation_id = operation_parts(request.name, "name", caller_id(call))
        now = self._recovery.clock.now()
        return operation(await action(owner, operation_id, now, request.reason, call.audit))

    async def ResetAgentSessions(
        self, request: admin_pb2.ResetAgentSessionsRequest, call: Call
    ) -> admin_pb2.ResetAgentSessionsResponse:
        _reason(request.reason)
        owner, tunnel_id = tunnel_parts(request.name, "name", caller_id(call))
        closed = await self._recovery.agents.reset(owner, tunnel_id, request.reason, call.audit)
        return admin_pb2.ResetAgentSessionsResponse(closed_sessions=closed)

    async def ResetCircuitBreaker(
        self, request: admin_pb2.ResetCircuitBreakerRequest, call: Call
    ) -> admin_pb2.CircuitBreaker:
        prefix, _, name = request.name.partition("/")
        if prefix != "circuitBreakers" or not _BREAKER_NAME.fullmatch(name):
            raise InvalidArgument.single("name", "must look like circuitBreakers/{kind}.{target}")
        _reason(request.reason)
        try:
            return _breaker(await self._breakers.reset(name, request.reason, call.audit))
        except LookupError:
            raise NotFound("circuit breaker", request.name) from None

    async def ListRateLimitViolations(
        self, request: admin_pb2.ListRateLimitViolationsRequest, call: Call
    ) -> admin_pb2.ListRateLimitViolationsResponse:
        page = await self._violations.list(
            page_size=request.page_size, page_token=request.page_token, filter=request.filter
        )
        return admin_pb2.ListRateLimitViolationsResponse(
            violations=[
                admin_pb2.RateLimitViolation(
                    window_start=convert.timestamp(v.window_start),
                    subject=v.subject,
                    ip_address=v.ip_address,
                    method=v.method,
                    policy=v.policy,
                    count=v.count,
                )
                for v in page.items
            ],
            next_page_token=page.next_page_token,
        )

    async def SummarizeRateLimitViolations(
        self, request: admin_pb2.SummarizeRateLimitViolationsRequest, call: Call
    ) -> admin_pb2.SummarizeRateLimitViolationsResponse:
        window = timedelta(hours=1)
        if request.HasField("window"):
            window = convert.from_duration(request.window, "window")
            if not timedelta(0) < window <= MAX_WINDOW:
                raise InvalidArgument.single("window", "must be more than 0 and at most 30 days")
        if not 0 <= request.top <= 100:
            raise InvalidArgument.single("top", "must be between 0 and 100")
        summary = await self._violations.summarize(window, request.top or 10)

        def counts(pairs: list[tuple[str, int]]) -> list[admin_pb2.ViolationCount]:
            return [admin_pb2.ViolationCount(key=k, count=n) for k, n in pairs]

        return admin_pb2.SummarizeRateLimitViolationsResponse(
            total=summary.total,
            top_subjects=counts(summary.subjects),
            top_methods=counts(summary.methods),
            top_addresses=counts(summary.addresses),
        )

    async def ListIpBlocks(
        self, request: admin_pb2.ListIpBlocksRequest, call: Call
    ) -> admin_pb2.ListIpBlocksResponse:
        query = self._lister.query(
            BLOCKS_SPEC, page_size=request.page_size, page_token=request.page_token
        )
        blocks = sorted(await self._limiter.blocks(), key=lambda b: (-b.since_ms, b.ip))
        if query.after is not None:
            since, ip = query.after
            blocks = [b for b in blocks if (-b.since_ms, b.ip) > (-since, ip)]
        page = self._lister.page(query, blocks[: query.limit + 1], lambda b: (b.since_ms, b.ip))
        return admin_pb2.ListIpBlocksResponse(
            ip_blocks=[
                admin_pb2.IpBlock(
                    name=f"ipBlocks/{b.ip}",
                    ip_address=b.ip,
                    reason="repeated rate-limit refusals",
                    create_time=convert.timestamp(_time(b.since_ms)),
                    expire_time=convert.timestamp(_time(b.until_ms)),
                )
                for b in page.items
            ],
            next_page_token=page.next_page_token,
        )

    async def DeleteIpBlock(
        self, request: admin_pb2.DeleteIpBlockRequest, call: Call
    ) -> empty_pb2.Empty:
        prefix, _, raw = request.name.partition("/")
        try:
            ip = str(ipaddress.ip_address(raw))
        except ValueError:
            ip = ""
        if prefix != "ipBlocks" or not ip:
            raise InvalidArgument.single("name", "must look like ipBlocks/{address}")
        if not await self._blocks.lift(ip, call.audit):
            raise NotFound("ip block", request.name)
        return empty_pb2.Empty()
