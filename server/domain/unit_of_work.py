"""The unit of work: one transaction and every aggregate's repositories bound to it.

Each aggregate declares the repositories it needs in its ``ports`` module; this protocol
gathers them, and ``server/storage`` implements it with SQLAlchemy.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Protocol, Self

from server.domain.analytics.ports import OutcomeRepository
from server.domain.audit.ports import AuditRepository
from server.domain.events.ports import EventRepository
from server.domain.identity.ports import (
    ApiKeyRepository,
    AvatarRepository,
    SessionRepository,
    UserRepository,
)
from server.domain.limits.ports import RequestUsageRepository, ViolationRepository
from server.domain.operations.ports import OperationRepository
from server.domain.proxies.ports import ProxyRepository
from server.domain.tunnels.ports import AgentRepository, ShareRepository, TunnelRepository
from server.domain.webhooks.ports import WebhookRepository


class UnitOfWork(Protocol):
    """One transaction and the repositories bound to it. Commits on a clean exit."""

    @property
    def users(self) -> UserRepository: ...
    @property
    def avatars(self) -> AvatarRepository: ...
    @property
    def sessions(self) -> SessionRepository: ...
    @property
    def api_keys(self) -> ApiKeyRepository: ...
    @property
    def audit(self) -> AuditRepository: ...
    @property
    def violations(self) -> ViolationRepository: ...
    @property
    def request_usage(self) -> RequestUsageRepository: ...
    @property
    def tunnels(self) -> TunnelRepository: ...
    @property
    def events(self) -> EventRepository: ...
    @property
    def shares(self) -> ShareRepository: ...
    @property
    def agents(self) -> AgentRepository: ...
    @property
    def webhooks(self) -> WebhookRepository: ...
    @property
    def operations(self) -> OperationRepository: ...
    @property
    def proxies(self) -> ProxyRepository: ...
    @property
    def call_outcomes(self) -> OutcomeRepository: ...

    async def __aenter__(self) -> Self: ...
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
    def after_commit(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` once the transaction has committed (never if it rolls back)."""


class UnitOfWorkFactory(Protocol):
    """Makes units of work.

    ``readonly``: no writes, on the primary (what authentication, authorization, resumes
    and read-before-write need). ``lag_tolerant``: no writes, and a read replica may serve
    it, up to ``TP_REPLICA_MAX_LAG`` behind, except for a caller who has just written (the
    API's own reads: gets and lists)."""

    def __call__(self, *, readonly: bool = False, lag_tolerant: bool = False) -> UnitOfWork: ...
