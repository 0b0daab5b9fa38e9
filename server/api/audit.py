"""AuditService."""

from __future__ import annotations

from tunnelplane.v1 import audit_pb2

from server.domain.audit.verification import AuditVerifier
from server.pipeline import Call


class AuditApi:
    """Serves ``tunnelplane.v1.AuditService``."""

    def __init__(self, verifier: AuditVerifier) -> None:
        self._verifier = verifier

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
