"""Audit: every call of an audited method, and every rejected credential, is recorded.

A successful call's entry is written by the unit of work that commits its change, in the
same transaction. A failed call's entry is written here, in a transaction of its own, so
that the failure is kept although the call's own writes were rolled back.
"""

from __future__ import annotations

import asyncio
import logging
from contextvars import Token

from google.protobuf.message import Message

from server.domain.audit import service as audit
from server.domain.audit.model import AuditScope
from server.domain.common.clock import Clock
from server.domain.common.errors import DomainError, Unauthenticated
from server.domain.unit_of_work import UnitOfWorkFactory
from server.pipeline import Call, Handler, MethodInfo, outcome_of


class AuditStage:
    """Opens the audit scope of audited calls and records failures."""

    def __init__(self, uow: UnitOfWorkFactory, clock: Clock, logger: logging.Logger) -> None:
        self._uow = uow
        self._clock = clock
        self._log = logger

    def wrap(self, method: MethodInfo, handler: Handler) -> Handler:
        action = audit.action_name(method.full_name)
        if not method.policy.audited:
            return self._rejected_credentials_only(method, handler)

        async def handle(request: Message, call: Call) -> Message:
            scope = self._scope(method, call, action)
            token: Token[AuditScope | None] | None = audit.open_scope(scope)
            try:
                return await handler(request, call)
            except BaseException as exc:
                if token is not None:
                    audit.close_scope(token)
                token = None
                await self._record_failure(scope, exc)
                raise
            finally:
                if token is not None:
                    audit.close_scope(token)

        return handle

    def _rejected_credentials_only(self, method: MethodInfo, handler: Handler) -> Handler:
        async def handle(request: Message, call: Call) -> Message:
            try:
                return await handler(request, call)
            except Unauthenticated as exc:
                if call.header("authorization"):
                    scope = self._scope(method, call, "auth.credential_rejected")
                    await self._record_failure(scope, exc)
                raise

        return handle

    @staticmethod
    def _scope(method: MethodInfo, call: Call, action: str) -> AuditScope:
        client = call.client
        return AuditScope(
            method=method.full_name,
            action=action,
            request_id=call.request_id,
            ip_address=client.ip_address,
            user_agent=client.user_agent[:512],
        )

    async def _record_failure(self, scope: AuditScope, exc: BaseException) -> None:
        outcome = outcome_of(exc).name
        reason = exc.reason if isinstance(exc, DomainError) else ""
        try:
            async with self._uow() as uow:
                if scope.recorded_id:
                    await uow.audit.set_outcome(scope.recorded_id, outcome, reason)
                else:
                    await uow.audit.add(scope.entry(self._clock.now(), outcome, reason))
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - see below
            # The call's own error is what the caller must see; a lost audit line is logged.
            self._log.exception("could not write audit entry", extra={"method": scope.method})
