"""The one table that turns a domain error into the ``google.rpc.Status`` a client gets.

``ErrorInfo`` always, plus ``BadRequest``, ``RetryInfo``, ``QuotaFailure``,
``PreconditionFailure`` or ``ResourceInfo`` where the error carries them. Every transport
sends what this module builds: the gRPC server (:mod:`server.grpc_server`) and the
in-process HTTP dispatch (:mod:`server.http`), after the error stage
(:mod:`server.interceptors.errors`) has made anything unexpected an ``INTERNAL``.
"""

from __future__ import annotations

import functools
from typing import Any

from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from server.domain.common.errors import (
    MAX_VIOLATION_BYTES,
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    clip,
)

ERROR_DOMAIN = "tunnelplane.dev"


def to_status(error: DomainError) -> status_pb2.Status:
    """The ``google.rpc.Status`` of a domain error, details included."""
    info = error_details_pb2.ErrorInfo(
        reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata
    )
    details = [_pack(info), *(_pack(d) for d in details_of(error))]
    return status_pb2.Status(code=int(error.code), message=clip(error.message), details=details)


@functools.singledispatch
def details_of(error: DomainError) -> list[Any]:  # noqa: ARG001 - the base case: none
    """The ``google.rpc`` detail messages of ``error`` besides its ``ErrorInfo``."""
    return []


@details_of.register
def _bad_request(error: InvalidArgument) -> list[Any]:
    kept: list[error_details_pb2.BadRequest.FieldViolation] = []
    size = 0
    for v in error.violations:
        item = error_details_pb2.BadRequest.FieldViolation(
            field=v.field, description=clip(v.description), reason=v.reason
        )
        size += item.ByteSize()
        if kept and size > MAX_VIOLATION_BYTES:
            break
        kept.append(item)
    return [error_details_pb2.BadRequest(field_violations=kept)]


@details_of.register(NotFound)
@details_of.register(AlreadyExists)
def _resource_info(error: NotFound | AlreadyExists) -> list[Any]:
    return [
        error_details_pb2.ResourceInfo(
            resource_type=error.resource_type, resource_name=clip(error.resource_name)
        )
    ]


@details_of.register
def _precondition_failure(error: FailedPrecondition) -> list[Any]:
    if not error.violations:
        return []
    return [
        error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type=v.type, subject=v.subject, description=v.description
                )
                for v in error.violations
            ]
        )
    ]


@details_of.register
def _quota_failure(error: ResourceExhausted) -> list[Any]:
    details: list[Any] = []
    if error.retry_after is not None:
        details.append(_retry_info(error.retry_after))
    if error.violations:
        details.append(
            error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(
                        subject=v.subject,
                        description=v.description,
                        quota_id=v.quota_id,
                        quota_metric=v.quota_metric,
                        quota_value=v.quota_value,
                    )
                    for v in error.violations
                ]
            )
        )
    return details


@details_of.register
def _unavailable(error: Unavailable) -> list[Any]:
    return [] if error.retry_after is None else [_retry_info(error.retry_after)]


def _retry_info(seconds: float) -> Any:
    seconds = max(seconds, 0.0)
    whole = int(seconds)
    return error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=whole, nanos=int((seconds - whole) * 1e9))
    )


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed
