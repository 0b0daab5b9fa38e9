"""Long streams: a per-user cap on open streams, and a credential verified on a timer.

Both stages are generic: they act on any streaming method, the cap where the method's
policy names a ``stream_limit`` (a tier limit such as ``max_watch_streams``), the
re-check on every stream that came with a credential. Both run after authorization, so a
refused or anonymous call holds no slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from google.protobuf.message import Message
from prometheus_client import CollectorRegistry, Counter, Gauge

from server.domain.common.errors import (
    DomainError,
    QuotaViolation,
    ResourceExhausted,
    Unauthenticated,
)
from server.domain.identity.model import Principal
from server.domain.identity.tiers import TierCatalog
from server.pipeline import Call, Handler, MethodInfo

Recheck = Callable[[Call], Awaitable[object]]


class OpenStreams:
    """How many streams each user holds open in this process, per limit."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, str], int] = {}

    def acquire(self, user_id: str, limit: str, cap: int) -> bool:
        """Take a slot unless ``cap`` (-1: unlimited) are taken already."""
        key = (user_id, limit)
        held = self._open.get(key, 0)
        if 0 <= cap <= held:
            return False
        self._open[key] = held + 1
        return True

    def release(self, user_id: str, limit: str) -> None:
        """Give a slot back."""
        key = (user_id, limit)
        held = self._open[key] - 1
        if held:
            self._open[key] = held
        else:
            del self._open[key]

    def held(self, user_id: str, limit: str) -> int:
        """The slots ``user_id`` holds under ``limit``."""
        return self._open.get((user_id, limit), 0)

    def total(self, limit: str) -> int:
        """Every slot held under ``limit``."""
        return sum(n for (_, name), n in self._open.items() if name == limit)


class StreamLimitStage:
    """Caps the streams one user holds open at once, per the method's ``stream_limit``.

    The count lives in this process: with several replicas a user may hold the cap on
    each (the limit is per replica, which bounds what any one replica must carry).
    """

    def __init__(self, tiers: TierCatalog, registry: CollectorRegistry) -> None:
        self._tiers = tiers
        self.open = OpenStreams()
        self._gauge = Gauge(
            "tunnelplane_streams_open",
            "Streams open in this process, by the tier limit that caps them.",
            ["limit"],
            registry=registry,
        )

    def wrap(self, method: MethodInfo, handler: Handler) -> Handler:
        limit = method.policy.stream_limit
        if not limit:
            return handler
        self._gauge.labels(limit).set_function(lambda: self.open.total(limit))
        name = method.name

        async def handle(request: Message, call: Call) -> Message:
            principal = call.principal
            if principal is None:  # only a public method gets here without a caller
                return await handler(request, call)
            cap = int(getattr(self._tiers.limits(principal.tier), limit))
            if not self.open.acquire(principal.user_id, limit, cap):
                raise _refusal(principal, limit, cap, name)
            try:
                return await handler(request, call)
            finally:
                self.open.release(principal.user_id, limit)

        return handle


def _refusal(principal: Principal, limit: str, cap: int, method: str) -> ResourceExhausted:
    tier = principal.tier.value
    quota_id = "".join(part.title() for part in limit.split("_"))  # MaxWatchStreams
    return ResourceExhausted(
        f"at most {cap} {method} streams may be open at once on the {tier} tier",
        violations=[
            QuotaViolation(
                f"users/{principal.user_id}",
                f"{limit}: at most {cap} open {method} streams per user ({tier} tier)",
                quota_id=quota_id,
                quota_metric=f"tunnelplane.v1/{limit.removeprefix('max_')}",
                quota_value=cap,
            )
        ],
        reason="STREAM_LIMIT_EXCEEDED",
    )


class StreamRecheckStage:
    """Verifies a stream's credential again every ``interval`` seconds while it runs.

    The handler runs beside a timer; when the credential no longer verifies (session
    signed out or revoked or past its end, API key revoked or expired, user suspended or
    deleted) the handler is cancelled and the stream ends with UNAUTHENTICATED, even when
    it has nothing to send. ``recheck`` decides (it lets an access token outlive its
    ``exp`` while its session lives). A check that cannot be made (storage unavailable)
    is logged and tried again at the next tick.
    """

    def __init__(
        self,
        recheck: Recheck,
        interval: float,
        log: logging.Logger,
        registry: CollectorRegistry,
    ) -> None:
        self._recheck = recheck
        self._interval = interval
        self._log = log
        checks = Counter(
            "tunnelplane_stream_credential_checks",
            "Timed credential checks of open streams, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self._valid = checks.labels("valid")
        self._refused = checks.labels("refused")
        self._failed = checks.labels("failed")

    def wrap(self, method: MethodInfo, handler: Handler) -> Handler:
        if method.grpc_type == "unary":
            return handler

        async def handle(request: Message, call: Call) -> Message:
            if call.principal is None:
                return await handler(request, call)
            task = asyncio.ensure_future(handler(request, call))
            try:
                return await self._watch(task, call)
            finally:
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

        return handle

    async def _watch(self, task: asyncio.Task[Message], call: Call) -> Message:
        """The handler's result, unless the credential stops verifying first."""
        while True:
            done, _ = await asyncio.wait({task}, timeout=self._interval)
            if done:
                return task.result()
            try:
                await self._recheck(call)
            except Unauthenticated:
                self._refused.inc()
                raise
            except DomainError as error:
                self._failed.inc()
                self._log.warning("stream credential check failed", extra={"code": error.code})
            else:
                self._valid.inc()
