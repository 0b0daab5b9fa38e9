"""AuditService."""

from __future__ import annotations

from google.protobuf.message import Message
from tunnelplane.v1 import audit_pb2

from server.api import convert
from server.domain.audit.model import AuditEntry
from server.domain.audit.search import AuditSearch
from server.domain.audit.verification import AuditVerifier
from server.pipeline import Call


def entry(found: AuditEntry) -> audit_pb2.AuditEntry:
    """The API form of an audit entry."""
    actor, api_key = convert.acted_by(found)
    answer = audit_pb2.AuditEntry(
        name=f"audit/entries/{found.id}",
        create_time=convert.timestamp(found.time),
        action=found.action,
        method=found.method,
        outcome=found.outcome,
        reason=found.reason,
        actor=actor,
        api_key=api_key,
        subject=f"users/{found.subject_user_id}" if found.subject_user_id else "",
        resource=found.resource,
        ip_address=found.ip_address,
        user_agent=found.user_agent,
        request_id=found.request_id,
        chain_day=found.chain_day,
        chain_sequence=found.chain_seq,
        hash=found.hash,
        erased=found.erased,
    )
    answer.details.update(found.details)
    return answer


class AuditApi:
    """Serves ``tunnelplane.v1.AuditService``."""

    def __init__(self, search: AuditSearch, verifier: AuditVerifier) -> None:
        self._search = search
        self._verifier = verifier

    async def ListAuditEntries(
        self, request: audit_pb2.ListAuditEntriesRequest, call: Call
    ) -> audit_pb2.ListAuditEntriesResponse:
        page = await self._search.list(
            page_size=request.page_size, page_token=request.page_token, filter=request.filter
        )
        return audit_pb2.ListAuditEntriesResponse(
            entries=[entry(e) for e in page.items], next_page_token=page.next_page_token
        )

    async def ExportAuditEntries(
        self, request: audit_pb2.ExportAuditEntriesRequest, call: Call
    ) -> Message:
        async for found in await self._search.export(request.filter, call.audit):
            await call.send(entry(found))
        return audit_pb2.AuditEntry()

    async def VerifyAuditLog(
        self, request: audit_pb2.VerifyAuditLogRequest, call: Call
    ) -> audit_pb2.AuditVerification:
        found = await self._verifier.verify(request.start_day, request.end_day)
        answer = audit_pb2.AuditVerification(
            start_day=found.start.isoformat(),
            end_day=found.end.isoformat(),
            intact=found.broken is None,
            days_checked=found.days_checked,
            entries_checked=found.entries_checked,
            unchained_entries=found.unchained,
        )
        if found.broken is not None:
            b = found.broken
            answer.first_break.CopyFrom(
                audit_pb2.AuditChainBreak(
                    entry_id=b.entry_id, day=b.day, sequence=b.seq, problem=b.problem
                )
            )
        return answer
