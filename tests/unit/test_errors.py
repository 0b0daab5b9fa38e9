"""The domain errors (server/domain/common/errors.py) and the one mapping to
``google.rpc.Status`` (server/interceptors/status.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2

from server.domain.common import errors
from server.domain.common.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    Code,
    DatabaseUnavailable,
    DeadlineExceeded,
    DomainError,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PreconditionViolation,
    QuotaViolation,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Violations,
    code_of,
)
from server.interceptors.status import ERROR_DOMAIN, to_status

ErrorInfo = error_details_pb2.ErrorInfo
BadRequest = error_details_pb2.BadRequest
RetryInfo = error_details_pb2.RetryInfo
QuotaFailure = error_details_pb2.QuotaFailure
PreconditionFailure = error_details_pb2.PreconditionFailure
ResourceInfo = error_details_pb2.ResourceInfo


def unpack(details: list[any_pb2.Any]) -> list[Message]:
    """Each packed detail as the message its type URL names."""
    known = [ErrorInfo, BadRequest, RetryInfo, QuotaFailure, PreconditionFailure, ResourceInfo]
    result = []
    for packed in details:
        (kind,) = [k for k in known if packed.Is(k.DESCRIPTOR)]
        message = kind()
        assert packed.Unpack(message)
        result.append(message)
    return result


@dataclass
class Case:
    error: DomainError
    code: Code
    reason: str
    message: str
    details: list[Message] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


CASES: dict[str, Case] = {
    "invalid argument": Case(
        InvalidArgument(
            [FieldViolation("user.email", "is required", "REQUIRED"), FieldViolation("x", "bad")]
        ),
        Code.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        "user.email: is required; x: bad",
        [
            BadRequest(
                field_violations=[
                    BadRequest.FieldViolation(
                        field="user.email", description="is required", reason="REQUIRED"
                    ),
                    BadRequest.FieldViolation(field="x", description="bad", reason="INVALID"),
                ]
            )
        ],
    ),
    "invalid argument, own message": Case(
        InvalidArgument([FieldViolation("page_size", "negative")], "page_size is wrong"),
        Code.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        "page_size is wrong",
        [
            BadRequest(
                field_violations=[
                    BadRequest.FieldViolation(
                        field="page_size", description="negative", reason="INVALID"
                    )
                ]
            )
        ],
    ),
    "not found": Case(
        NotFound("user", "users/usr_1"),
        Code.NOT_FOUND,
        "NOT_FOUND",
        "user 'users/usr_1' not found",
        [ResourceInfo(resource_type="user", resource_name="users/usr_1")],
    ),
    "already exists": Case(
        AlreadyExists("user", "ann@example.com", reason="EMAIL_TAKEN"),
        Code.ALREADY_EXISTS,
        "EMAIL_TAKEN",
        "user 'ann@example.com' already exists",
        [ResourceInfo(resource_type="user", resource_name="ann@example.com")],
    ),
    "failed precondition": Case(
        FailedPrecondition(
            "user is deleted",
            [PreconditionViolation("STATE", "users/usr_1", "deleted")],
            reason="USER_DELETED",
        ),
        Code.FAILED_PRECONDITION,
        "USER_DELETED",
        "user is deleted",
        [
            PreconditionFailure(
                violations=[
                    PreconditionFailure.Violation(
                        type="STATE", subject="users/usr_1", description="deleted"
                    )
                ]
            )
        ],
    ),
    "failed precondition, bare": Case(
        FailedPrecondition("not now"), Code.FAILED_PRECONDITION, "FAILED_PRECONDITION", "not now"
    ),
    "aborted": Case(Aborted("etag is stale"), Code.ABORTED, "ABORTED", "etag is stale"),
    "permission denied": Case(
        PermissionDenied("no", reason="NOT_OWNER", metadata={"permission": "users.read"}),
        Code.PERMISSION_DENIED,
        "NOT_OWNER",
        "no",
        metadata={"permission": "users.read"},
    ),
    "unauthenticated": Case(
        Unauthenticated("who?"), Code.UNAUTHENTICATED, "UNAUTHENTICATED", "who?"
    ),
    "resource exhausted": Case(
        ResourceExhausted(
            "slow down",
            retry_after=1.5,
            violations=[QuotaViolation("users/usr_1", "100 requests per minute")],
            reason="RATE_LIMITED",
            metadata={"limit": "100"},
        ),
        Code.RESOURCE_EXHAUSTED,
        "RATE_LIMITED",
        "slow down",
        [
            RetryInfo(retry_delay={"seconds": 1, "nanos": 500_000_000}),
            QuotaFailure(
                violations=[
                    QuotaFailure.Violation(
                        subject="users/usr_1", description="100 requests per minute"
                    )
                ]
            ),
        ],
        {"limit": "100"},
    ),
    "resource exhausted, bare": Case(
        ResourceExhausted("full"), Code.RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED", "full"
    ),
    "unavailable with retry": Case(
        Unavailable("database down", retry_after=0.25),
        Code.UNAVAILABLE,
        "UNAVAILABLE",
        "database down",
        [RetryInfo(retry_delay={"seconds": 0, "nanos": 250_000_000})],
    ),
    "unavailable, negative retry clamps": Case(
        Unavailable("x", retry_after=-3.0),
        Code.UNAVAILABLE,
        "UNAVAILABLE",
        "x",
        [RetryInfo(retry_delay={})],
    ),
    "unavailable, bare": Case(Unavailable("x"), Code.UNAVAILABLE, "UNAVAILABLE", "x"),
    "database unavailable: the same to callers": Case(
        DatabaseUnavailable("the database is unavailable", retry_after=1.0),
        Code.UNAVAILABLE,
        "UNAVAILABLE",
        "the database is unavailable",
        [RetryInfo(retry_delay={"seconds": 1})],
    ),
    "deadline exceeded": Case(
        DeadlineExceeded("too slow"), Code.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", "too slow"
    ),
    "cancelled": Case(Cancelled("gone"), Code.CANCELLED, "CANCELLED", "gone"),
    "internal": Case(Internal(), Code.INTERNAL, "INTERNAL", "internal error"),
    "unimplemented": Case(
        Unimplemented("not here"), Code.UNIMPLEMENTED, "UNIMPLEMENTED", "not here"
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_status_has_code_message_error_info_and_details(name: str) -> None:
    case = CASES[name]
    status = to_status(case.error)
    assert status.code == case.code
    assert status.message == case.message
    info, *details = unpack(list(status.details))
    assert info == ErrorInfo(reason=case.reason, domain=ERROR_DOMAIN, metadata=case.metadata)
    assert details == case.details
    assert code_of(case.error) == case.code


def _concrete_subclasses(cls: type[DomainError]) -> set[type[DomainError]]:
    found = set()
    for sub in cls.__subclasses__():
        found |= _concrete_subclasses(sub)
        if not sub.__name__.startswith("_"):
            found.add(sub)
    return found


def test_every_domain_error_has_a_case() -> None:
    covered = {type(case.error) for case in CASES.values()}
    in_module = {c for c in _concrete_subclasses(DomainError) if c.__module__ == errors.__name__}
    assert in_module <= covered


def test_codes_match_grpc_and_google_rpc() -> None:
    for code in Code:
        assert grpc.StatusCode[code.name].value[0] == code.value
        assert code_pb2.Code.Value(code.name) == code.value


@pytest.mark.parametrize("exc", [ValueError("secret"), KeyError("k"), RuntimeError(), Exception()])
def test_anything_else_is_internal(exc: BaseException) -> None:
    assert code_of(exc) == Code.INTERNAL


def test_internal_carries_no_text_of_its_own() -> None:
    with pytest.raises(TypeError):
        Internal("SELECT * FROM users")  # type: ignore[call-arg]
    status = to_status(Internal())
    assert status.message == "internal error"
    (info,) = unpack(list(status.details))
    assert info == ErrorInfo(reason="INTERNAL", domain=ERROR_DOMAIN)


def test_single_violation_and_empty_message() -> None:
    error = InvalidArgument.single("filter", "unknown field", "UNKNOWN_FIELD")
    assert error.violations == [FieldViolation("filter", "unknown field", "UNKNOWN_FIELD")]
    assert error.message == "filter: unknown field"
    assert InvalidArgument([]).message == "invalid argument"


def test_status_text_is_bounded() -> None:
    long_name = "users/" + "é" * 5000
    status = to_status(NotFound("user", long_name))
    assert len(status.message.encode()) <= errors.MAX_TEXT_BYTES
    assert status.message.endswith("...")
    _, resource = unpack(list(status.details))
    assert isinstance(resource, ResourceInfo)
    assert len(resource.resource_name.encode()) <= errors.MAX_TEXT_BYTES
    many = InvalidArgument([FieldViolation(f"f{i}", "x" * 300) for i in range(100)])
    _, bad_request = unpack(list(to_status(many).details))
    assert isinstance(bad_request, BadRequest)
    assert 1 <= len(bad_request.field_violations) < 100
    assert bad_request.field_violations[0].field == "f0"
    assert bad_request.ByteSize() <= errors.MAX_VIOLATION_BYTES


def test_violations_collect_every_field_in_order() -> None:
    collected = Violations()
    assert not collected
    collected.raise_if_any()  # nothing collected: no error
    collected.add("a", "is required", "REQUIRED")
    collected.add("b", "is too long")
    assert collected
    with pytest.raises(InvalidArgument) as caught:
        collected.raise_if_any()
    assert caught.value.violations == [
        FieldViolation("a", "is required", "REQUIRED"),
        FieldViolation("b", "is too long", "INVALID"),
    ]
    assert caught.value.message == "a: is required; b: is too long"
