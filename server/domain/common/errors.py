"""The domain's exception vocabulary: what a use case raises on purpose, and why.

Plain Python, no wire types: each error carries its canonical :class:`Code`, a reason, a
message for the client and the facts a transport reports as details (field violations,
the resource, the quota, when to retry). The transports map them to ``google.rpc.Status``
in one place, :mod:`server.interceptors.status`.
"""

# ruff: noqa: N818 - error classes are named after the google.rpc codes they carry (NotFound)

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

#: Messages and details often quote the request (a resource name, a mask path). Bounded,
#: a hostile value cannot push the status past the peer's metadata limit (8 KiB by
#: default in gRPC), which would reach the client as a broken stream instead.
MAX_TEXT_BYTES = 400
#: Field violations reported at most, in bytes of the encoded ``BadRequest``.
MAX_VIOLATION_BYTES = 2048


def clip(text: str, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """``text`` cut to at most ``max_bytes`` of UTF-8, marked with an ellipsis if cut."""
    encoded = text.encode()
    if len(encoded) <= max_bytes:
        return text
    return encoded[: max_bytes - 3].decode(errors="ignore") + "..."


class Code(enum.IntEnum):
    """Canonical status codes (``google.rpc.Code``), without importing grpc."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad request field: its dotted path and what is wrong with it."""

    field: str
    description: str
    reason: str = "INVALID"


@dataclass(frozen=True, slots=True)
class QuotaViolation:
    """One exhausted quota or limit."""

    subject: str
    description: str
    #: Which quota or limit (``QuotaFailure.Violation.quota_id``), e.g. ``RequestsPerMonth``.
    quota_id: str = ""
    #: What it counts (``quota_metric``), e.g. ``tunnelplane.v1/requests``.
    quota_metric: str = ""
    #: Its value for this caller (``quota_value``); 0 when not applicable.
    quota_value: int = 0


@dataclass(frozen=True, slots=True)
class PreconditionViolation:
    """One failed precondition: its type (e.g. ``STATE``), subject and why."""

    type: str
    subject: str
    description: str


class DomainError(Exception):
    """Base of every error the domain raises on purpose. ``message`` reaches the client."""

    code: ClassVar[Code] = Code.UNKNOWN
    default_reason: ClassVar[str] = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})


class InvalidArgument(DomainError):
    """The request is malformed; ``violations`` name each bad field."""

    code = Code.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(self, violations: Iterable[FieldViolation], message: str = "") -> None:
        self.violations = list(violations)
        if not message:
            message = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        super().__init__(message or "invalid argument")

    @classmethod
    def single(cls, field: str, description: str, reason: str = "INVALID") -> InvalidArgument:
        """One violation."""
        return cls([FieldViolation(field, description, reason)])


class _ResourceError(DomainError):
    def __init__(
        self, resource_type: str, resource_name: str, message: str = "", *, reason: str = ""
    ) -> None:
        self.resource_type = resource_type
        self.resource_name = resource_name
        super().__init__(message or self._message(), reason=reason or None)

    def _message(self) -> str:
        return f"{self.resource_type} {self.resource_name!r}"


class NotFound(_ResourceError):
    """The named resource does not exist (or the caller may not know that it does)."""

    code = Code.NOT_FOUND
    default_reason = "NOT_FOUND"

    def _message(self) -> str:
        return f"{self.resource_type} {self.resource_name!r} not found"


class AlreadyExists(_ResourceError):
    """A resource with that identity exists already."""

    code = Code.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"

    def _message(self) -> str:
        return f"{self.resource_type} {self.resource_name!r} already exists"


class FailedPrecondition(DomainError):
    """The system is not in a state the operation needs."""

    code = Code.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"

    def __init__(
        self,
        message: str,
        violations: Iterable[PreconditionViolation] = (),
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.violations = list(violations)
        super().__init__(message, reason=reason, metadata=metadata)


class Aborted(DomainError):
    """A concurrent change won; retry after re-reading (for example a stale etag)."""

    code = Code.ABORTED
    default_reason = "ABORTED"


class PermissionDenied(DomainError):
    """The caller is known but may not do this."""

    code = Code.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(DomainError):
    """No valid credential was presented."""

    code = Code.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class ResourceExhausted(DomainError):
    """A limit or quota is used up; ``retry_after`` says when to try again."""

    code = Code.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        violations: Iterable[QuotaViolation] = (),
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.retry_after = retry_after
        self.violations = list(violations)
        super().__init__(message, reason=reason, metadata=metadata)


class Unavailable(DomainError):
    """A dependency is down or the server is shedding load; retry later."""

    code = Code.UNAVAILABLE
    default_reason = "UNAVAILABLE"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class DatabaseUnavailable(Unavailable):
    """The database could not be reached, or the connection broke: nothing was written
    unless the commit itself was lost. A read that fails so may be run again."""


class DeadlineExceeded(DomainError):
    """The call ran past its deadline."""

    code = Code.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class Cancelled(DomainError):
    """The caller went away."""

    code = Code.CANCELLED
    default_reason = "CANCELLED"


class Internal(DomainError):
    """Something unexpected failed. The message is always generic."""

    code = Code.INTERNAL
    default_reason = "INTERNAL"

    def __init__(self) -> None:
        super().__init__("internal error")


class Unimplemented(DomainError):
    """The method exists in the contract but this server does not serve it."""

    code = Code.UNIMPLEMENTED
    default_reason = "UNIMPLEMENTED"


def code_of(exc: BaseException) -> Code:
    """The status code an exception will be reported with."""
    if isinstance(exc, DomainError):
        return exc.code
    return Code.INTERNAL


class Violations:
    """Collects field violations so that one response names every bad field."""

    def __init__(self) -> None:
        self._items: list[FieldViolation] = []

    def add(self, field: str, description: str, reason: str = "INVALID") -> None:
        """Record one bad field."""
        self._items.append(FieldViolation(field, description, reason))

    def __bool__(self) -> bool:
        return bool(self._items)

    def extend(self, items: Iterable[FieldViolation]) -> None:
        """Record several bad fields (from a validator that raised)."""
        self._items.extend(items)

    def raise_if_any(self) -> None:
        """Raise :class:`InvalidArgument` with everything collected, if anything was."""
        if self._items:
            raise InvalidArgument(self._items)
