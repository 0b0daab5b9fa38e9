"""Rate limits, quotas and load shedding: one stage, the same for gRPC and HTTP callers.

Per call: shed non-critical work when the server is overloaded (lowest tier first); then
one limiter decision covers the address block and the address's limit (anonymous callers
only: an authenticated caller is held to its own limit, never blocked with the anonymous
traffic of its address), the subject's limit (tier rate, tightened by load, with a short
wait near the limit instead of a refusal) and the monthly request quota, where only a
genuine retry (same subject, method, request id and request) is not counted again; the
counter's value is noted for the usage roll-up. The limit fields go back as metadata
(trailers, which cost grpc.aio nothing extra; the gateway turns them into headers), and
refusals carry ``RetryInfo`` and ``QuotaFailure``. Exempt calls are evaluated without being
counted, and logged when they would have been refused.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from google.protobuf.message import Message
from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client import Counter as PromCounter

from server.domain.common.addresses import Network
from server.domain.common.clock import Clock
from server.domain.common.errors import QuotaViolation, ResourceExhausted, Unavailable
from server.domain.identity.model import CredentialKind, Principal, Role, Tier, TierLimits
from server.domain.limits.model import BlockPolicy, Bucket, Check, Decision, Enforcement, Outcome
from server.domain.limits.ports import Limiter
from server.domain.limits.rules import (
    in_networks,
    month_bounds,
    month_tag,
    quota_key,
    rate_headers,
    retry_key,
)
from server.domain.limits.service import RequestUsage, ViolationLog
from server.load import LoadMonitor
from server.pipeline import Call, Handler, MethodInfo

_MESSAGES = {
    Outcome.IP_BLOCKED: "this address is blocked for repeated violations",
    Outcome.IP_LIMITED: "too many calls from this address",
    Outcome.SUBJECT_LIMITED: "rate limit exceeded",
    Outcome.QUOTA_EXCEEDED: "monthly request quota exhausted",
}
REQUESTS_METRIC = "tunnelplane.v1/requests"
_REASONS = {
    Outcome.IP_BLOCKED: "IP_BLOCKED",
    Outcome.IP_LIMITED: "IP_RATE_LIMITED",
    Outcome.SUBJECT_LIMITED: "RATE_LIMITED",
    Outcome.QUOTA_EXCEEDED: "QUOTA_EXCEEDED",
}


@dataclass(frozen=True, slots=True)
class RatePolicy:
    """The limits, from settings."""

    tiers: Mapping[str, TierLimits]
    ip_bucket: Bucket
    block: BlockPolicy
    max_wait_ms: float
    queue_limit: int
    exempt_roles: frozenset[Role]
    exempt_networks: tuple[Network, ...]

    def bucket(self, tier: Tier) -> Bucket:
        """A tier's steady rate and burst."""
        limits = self.tiers[tier.value]
        return Bucket(limits.requests_per_minute, limits.burst)

    def monthly_requests(self, tier: Tier) -> int:
        """A tier's monthly request quota (-1: unlimited)."""
        return self.tiers[tier.value].requests_per_month


class LimiterMetrics:
    """Decisions, waits, queue depth, adaptive factors and the backend in use."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = PromCounter(
            "tunnelplane_ratelimit_decisions_total",
            "Rate-limit decisions by policy and result.",
            ["policy", "result"],
            registry=registry,
        )
        self.wait = Histogram(
            "tunnelplane_ratelimit_queue_wait_seconds",
            "Time calls waited for their slot near the limit.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
            registry=registry,
        )
        self.queued = Gauge(
            "tunnelplane_ratelimit_queued_calls", "Calls waiting for a slot.", registry=registry
        )
        self.factor = Gauge(
            "tunnelplane_adaptive_limit_factor",
            "Share of each tier's normal rate limit allowed under the current load.",
            ["tier"],
            registry=registry,
        )
        self.load = Gauge("tunnelplane_load_level", "Load from 0 to 1.", registry=registry)
        self.backend = Gauge(
            "tunnelplane_ratelimit_backend",
            "1 for the limiter backend in use.",
            ["backend"],
            registry=registry,
        )
        self.errors = PromCounter(
            "tunnelplane_ratelimit_errors_total",
            "Limiter decisions Redis answered with an error (decided in-process instead).",
            registry=registry,
        )
        self.redis_runs = PromCounter(
            "tunnelplane_ratelimit_redis_runs_total",
            "Decisions made by a script run in Redis (the others came from leased slices).",
            registry=registry,
        )
        self.switches = PromCounter(
            "tunnelplane_ratelimit_backend_switches_total",
            "Switches between Redis and the in-process limiter.",
            ["to"],
            registry=registry,
        )

    def use_backend(self, backend: str, *, switched: bool) -> None:
        """Record the backend in use."""
        for name in ("redis", "memory"):
            self.backend.labels(name).set(1 if name == backend else 0)
        if switched:
            self.switches.labels(backend).inc()


def subject_of(principal: Principal | None, ip: str) -> str:
    """Who a limit counts: the API key, the user, or the address of anonymous callers."""
    if principal is None:
        return f"ip/{ip}"
    if principal.credential == CredentialKind.API_KEY:
        return f"apiKeys/{principal.api_key_id}"
    return f"users/{principal.user_id}"


class RateLimitStage:
    """Applies :class:`RatePolicy` to every call, after authentication."""

    def __init__(
        self,
        limiter: Limiter,
        policy: RatePolicy,
        load: LoadMonitor,
        violations: ViolationLog,
        metrics: LimiterMetrics,
        clock: Clock,
        logger: logging.Logger,
        usage: RequestUsage,
    ) -> None:
        self._usage = usage
        self._limiter = limiter
        self._policy = policy
        self._load = load
        self._violations = violations
        self._metrics = metrics
        self._clock = clock
        self._log = logger
        self.waiting: Counter[str] = Counter()
        self._allowed = metrics.decisions.labels("subject", "allowed")
        self._month_end = -math.inf  # when the cached month tag goes stale (epoch seconds)
        self._month = ""

    def wrap(self, method: MethodInfo, handler: Handler) -> Handler:
        cost = method.policy.rate_cost
        critical = method.policy.critical
        exempt_by_policy = method.policy.rate_exempt
        counted = not method.policy.quota_free
        name = method.full_name

        async def admit_stream(request: Message, call: Call) -> Message:
            # A stream is admitted like a call, but its life is not load: in-flight counts
            # only while it is being admitted.
            self._load.enter()
            try:
                await self._admit(
                    request, call, name, cost, critical=critical, exempt=exempt_by_policy,
                    counted=counted,
                )  # fmt: skip
            finally:
                self._load.leave()
            return await handler(request, call)

        if method.grpc_type != "unary":
            return admit_stream

        async def handle(request: Message, call: Call) -> Message:
            self._load.enter()
            try:
                await self._admit(
                    request, call, name, cost, critical=critical, exempt=exempt_by_policy,
                    counted=counted,
                )  # fmt: skip
                return await handler(request, call)
            finally:
                self._load.leave()

        return handle

    async def _admit(
        self,
        request: Message,
        call: Call,
        method: str,
        cost: int,
        *,
        critical: bool,
        exempt: bool,
        counted: bool,
    ) -> None:
        principal, ip = call.principal, call.client_ip
        tier = principal.tier if principal is not None else Tier.FREE
        subject = subject_of(principal, ip)
        policy = self._policy
        if exempt:  # by policy: the call must not spend the caller's budget
            enforcement = Enforcement.DRY_RUN
        elif self._exempt(principal, ip):  # by role or address: counted, never refused
            enforcement = Enforcement.COUNT_ONLY
        else:
            enforcement = Enforcement.ENFORCE
        exempt = enforcement != Enforcement.ENFORCE
        if not exempt and self._load.sheds(tier, critical=critical):
            call.trailers.append(("retry-after", "1"))
            self._refuse_shed(subject, ip, method, tier)
        bucket = policy.bucket(tier).scaled(self._load.factor(tier))
        check = self._check(
            request, call, principal if counted else None, subject, bucket, cost, enforcement
        )
        decision = await self._limiter.decide(check)
        if decision.quota_used > 0:
            self._usage.counted(check.quota_key, decision)
        # An exempt caller over its limit is answered, not refused: no Retry-After.
        call.trailers.extend(
            rate_headers(decision, bucket, refused=not (exempt or decision.allowed))
        )
        if exempt:
            self._exempted(decision, subject, ip, method)
            return
        if decision.wait_ms and self.waiting[subject] >= self._policy.queue_limit:
            # Concurrent calls were decided together; the queue filled meanwhile. The slot
            # stays reserved (spent), which errs on the side of the limit.
            decision = Decision(
                Outcome.SUBJECT_LIMITED, retry_after_ms=decision.wait_ms, reset_ms=decision.reset_ms
            )
        if not decision.allowed:
            self._refuse(decision, subject, ip, method, bucket, tier)
        self._allowed.inc()
        if decision.wait_ms:
            await self._wait(subject, decision.wait_ms)

    def _check(
        self,
        request: Message,
        call: Call,
        quota_payer: Principal | None,
        subject: str,
        bucket: Bucket,
        cost: int,
        enforcement: Enforcement,
    ) -> Check:
        policy = self._policy
        queue_full = self.waiting[subject] >= policy.queue_limit
        quota_limit, key, reset_ms, dedupe = -1, "", 0.0, ""
        if quota_payer is not None:
            now = self._clock.time()
            if now >= self._month_end:
                today = self._clock.now()
                self._month, self._month_end = month_tag(today), month_bounds(today)[1].timestamp()
            quota_limit = policy.monthly_requests(quota_payer.tier)
            key = quota_key(quota_payer.user_id, "requests", self._month)
            reset_ms = (self._month_end - now) * 1000
            if call.request_id_given and quota_limit >= 0:
                serialized = request.SerializeToString(deterministic=True)
                dedupe = retry_key(subject, call.method.full_name, call.request_id, serialized)
        return Check(
            subject=subject,
            ip=call.client_ip,
            subject_bucket=bucket,
            ip_bucket=policy.ip_bucket,
            cost=cost,
            max_wait_ms=policy.max_wait_ms
            if enforcement == Enforcement.ENFORCE and not queue_full
            else 0.0,
            quota_key=key,
            quota_limit=quota_limit,
            quota_reset_ms=reset_ms,
            dedupe=dedupe,
            enforcement=enforcement,
            block=policy.block,
            by_address=call.principal is None,
        )

    def _exempt(self, principal: Principal | None, ip: str) -> bool:
        if principal is not None and principal.role in self._policy.exempt_roles:
            return True
        return bool(self._policy.exempt_networks) and in_networks(ip, self._policy.exempt_networks)

    def _exempted(self, decision: Decision, subject: str, ip: str, method: str) -> None:
        result = "exempt" if decision.allowed else "exempt_would_refuse"
        self._metrics.decisions.labels(decision.outcome.policy or "subject", result).inc()
        if not decision.allowed:
            self._log.info(
                "exempt call would have been rate limited",
                extra={"subject": subject, "client_ip": ip, "method": method,
                       "policy": decision.outcome.policy},
            )  # fmt: skip

    def _refuse(
        self, decision: Decision, subject: str, ip: str, method: str, bucket: Bucket, tier: Tier
    ) -> None:
        outcome = decision.outcome
        self._metrics.decisions.labels(outcome.policy, "refused").inc()
        self._violations.record(subject, ip, method, outcome.policy)
        if decision.blocked_now:
            self._log.warning("address blocked", extra={"client_ip": ip, "method": method})
        retry = decision.retry_after_ms / 1000
        violation = self._violation(outcome, subject, ip, bucket, tier)
        raise ResourceExhausted(
            _MESSAGES[outcome],
            retry_after=retry,
            violations=[violation],
            reason=_REASONS[outcome],
            metadata={"subject": subject},
        )

    def _violation(
        self, outcome: Outcome, subject: str, ip: str, bucket: Bucket, tier: Tier
    ) -> QuotaViolation:
        if outcome == Outcome.QUOTA_EXCEEDED:
            monthly = self._policy.monthly_requests(tier)
            return QuotaViolation(
                subject, f"{monthly} requests per month ({tier.value} tier)",
                "RequestsPerMonth", REQUESTS_METRIC, monthly,
            )  # fmt: skip
        if outcome in {Outcome.IP_BLOCKED, Outcome.IP_LIMITED}:
            limit = self._policy.ip_bucket.limit
            return QuotaViolation(
                f"ip/{ip}", f"{limit} requests per minute per address",
                "RequestsPerMinutePerAddress", REQUESTS_METRIC, limit,
            )  # fmt: skip
        described = f"{bucket.limit} requests per minute, burst {bucket.burst} ({tier.value} tier)"
        return QuotaViolation(
            subject, described, "RequestsPerMinute", REQUESTS_METRIC, bucket.limit
        )

    def _refuse_shed(self, subject: str, ip: str, method: str, tier: Tier) -> None:
        self._metrics.decisions.labels("shed", tier.value).inc()
        self._violations.record(subject, ip, method, "shed")
        raise Unavailable("the server is overloaded; retry shortly", retry_after=1.0)

    async def _wait(self, subject: str, wait_ms: int) -> None:
        self.waiting[subject] += 1
        self._metrics.queued.inc()
        started = time.perf_counter()
        try:
            await asyncio.sleep(wait_ms / 1000)
        finally:
            self.waiting[subject] -= 1
            if not self.waiting[subject]:
                del self.waiting[subject]
            self._metrics.queued.dec()
            self._metrics.wait.observe(time.perf_counter() - started)

    def queues(self, top: int = 10) -> Sequence[tuple[str, int]]:
        """The longest waiting queues."""
        return self.waiting.most_common(top)
