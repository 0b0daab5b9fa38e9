"""Audit: every call of an audited method, and every rejected credential, is recorded.

Which methods are audited is the policy's ``audited`` option in the contract. For such a
method this stage opens the call's :class:`AuditTrail` (``call.audit``) from the call's
context; the servicer hands it to the use case, which records the entry in the unit of
work of its change (:mod:`server.domain.audit.service`). The stage runs after
authentication, so the trail names the caller.

A call that fails is recorded here, in a transaction of its own, so that the failure is
kept although the call's own writes were rolled back: by correcting the outcome of the
entry the use case committed, or else as a new entry with what the use case noted.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from google.protobuf.message import Message

from server.domain.audit.model import AuditTrail, RequestContext
from server.domain.audit.rules import action_name
from server.domain.common.clock import Clock
from server.domain.common.errors import DomainError, Unauthenticated
from server.domain.common.ids import new_id
from server.domain.unit_of_work import UnitOfWorkFactory
from server.pipeline import Call, Handler, MethodInfo, outcome_of


class AuditStage:
    """Opens the audit trail of audited calls and records failures."""

    def __init__(self, uow: UnitOfWorkFactory, clock: Clock, logger: logging.Logger) -> None:
        self._uow = uow
        self._clock = clock
        self._log = logger

    def wrap(self, method: MethodInfo, handler: Handler) -> Handler:
        if not method.policy.audited:
            return self._rejected_credentials_only(method, handler)
        action = action_name(method.full_name)

        async def handle(request: Message, call: Call) -> Message:
            trail = call.audit = AuditTrail(context_of(call, action))
            try:
                return await handler(request, call)
            except BaseException as exc:
                await self._record_failure(trail, exc)
                raise

        return handle

    def _rejected_credentials_only(self, method: MethodInfo, handler: Handler) -> Handler:
        async def handle(request: Message, call: Call) -> Message:
            try:
                return await handler(request, call)
            except Unauthenticated as exc:
                if call.header("authorization"):
                    trail = AuditTrail(context_of(call, "auth.credential_rejected"))
                    await self._record_failure(trail, exc)
                raise

        return handle

    async def _record_failure(self, trail: AuditTrail, exc: BaseException) -> None:
        outcome = outcome_of(exc).name
        reason = exc.reason if isinstance(exc, DomainError) else ""
        try:
            async with self._uow() as uow:
                entry = trail.entry(self._clock.now(), outcome, reason)
                if trail.added and await uow.audit.exists(trail.id):
                    # The use case's entry committed, then the call failed: the log is
                    # append-only, so a second entry corrects the first.
                    entry = replace(
                        entry, id=new_id("aud"), details={**entry.details, "corrects": trail.id}
                    )
                await uow.audit.add(entry)
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - see below
            # The call's own error is what the caller must see; a lost audit line is logged.
            method = trail.context.method
            self._log.exception("could not write audit entry", extra={"method": method})


def context_of(call: Call, action: str) -> RequestContext:
    """What an audit entry says about ``call``: its method, caller and client."""
    client = call.client
    principal = call.principal
    return RequestContext(
        method=call.method.full_name,
        action=action,
        request_id=call.request_id,
        ip_address=client.ip_address,
        user_agent=client.user_agent[:512],
        actor_user_id=principal.user_id if principal is not None else "",
        api_key_id=principal.api_key_id if principal is not None else "",
    )
