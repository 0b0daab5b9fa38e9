"""gRPC status -> HTTP status and the JSON error body.

The body is the ``google.rpc.Status`` (from ``grpc-status-details-bin`` when the upstream
sent one) in proto3 JSON, details rendered with their ``@type``, plus the request id so a
user can quote it.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from google.protobuf import any_pb2, descriptor_pool, json_format
from google.rpc import error_details_pb2, status_pb2

#: grpc status code -> HTTP status (TRANSCODING.md, as grpc-gateway and Envoy map them).
HTTP_STATUS: Mapping[int, int] = {
    0: 200,  # OK
    1: 499,  # CANCELLED
    2: 500,  # UNKNOWN
    3: 400,  # INVALID_ARGUMENT
    4: 504,  # DEADLINE_EXCEEDED
    5: 404,  # NOT_FOUND
    6: 409,  # ALREADY_EXISTS
    7: 403,  # PERMISSION_DENIED
    8: 429,  # RESOURCE_EXHAUSTED
    9: 400,  # FAILED_PRECONDITION
    10: 409,  # ABORTED
    11: 400,  # OUT_OF_RANGE
    12: 501,  # UNIMPLEMENTED
    13: 500,  # INTERNAL
    14: 503,  # UNAVAILABLE
    15: 500,  # DATA_LOSS
    16: 401,  # UNAUTHENTICATED
}
INVALID_ARGUMENT, NOT_FOUND, UNIMPLEMENTED, INTERNAL = 3, 5, 12, 13
GATEWAY_DOMAIN = "gateway"


def http_status(code: int) -> int:
    """The HTTP status of a gRPC code (unknown codes are 500)."""
    return HTTP_STATUS.get(code, 500)


class GatewayError(Exception):
    """An error the gateway answers itself, before or instead of the upstream."""

    def __init__(
        self,
        status: status_pb2.Status,
        http: int | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        super().__init__(status.message)
        self.status = status
        self.http = http or http_status(status.code)
        self.headers = list(headers)

    @classmethod
    def simple(cls, code: int, message: str, reason: str, http: int | None = None) -> GatewayError:
        """An error with an ``ErrorInfo`` detail."""
        status = status_pb2.Status(code=code, message=message)
        _add(status, error_details_pb2.ErrorInfo(reason=reason, domain=GATEWAY_DOMAIN))
        return cls(status, http)

    @classmethod
    def invalid_argument(cls, violations: list[tuple[str, str]]) -> GatewayError:
        """A 400 with a ``BadRequest`` naming each field."""
        message = "; ".join(f"{f}: {d}" for f, d in violations)
        status = status_pb2.Status(code=INVALID_ARGUMENT, message=message)
        _add(status, error_details_pb2.ErrorInfo(reason="INVALID_ARGUMENT", domain=GATEWAY_DOMAIN))
        _add(
            status,
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                    for f, d in violations
                ]
            ),
        )
        return cls(status)


def _add(status: status_pb2.Status, detail: Any) -> None:
    packed = any_pb2.Any()
    packed.Pack(detail)
    status.details.append(packed)


def status_from_trailers(
    code: int, message: str, trailers: Iterable[tuple[str, Any]]
) -> status_pb2.Status:
    """The rich status from ``grpc-status-details-bin`` if present and consistent."""
    for key, value in trailers:
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            try:
                status = status_pb2.Status.FromString(value)
            except Exception:  # noqa: BLE001 - a malformed detail falls back to the plain status
                break
            if status.code == code:
                return status
            break
    return status_pb2.Status(code=code, message=message)


def error_body(
    status: status_pb2.Status, request_id: str, pool: descriptor_pool.DescriptorPool | None
) -> bytes:
    """The JSON body of an error response."""
    details = [_detail(d, pool) for d in status.details]
    document = {"code": status.code, "message": status.message, "details": details}
    if request_id:
        document["requestId"] = request_id
    return orjson.dumps(document)


def _detail(packed: any_pb2.Any, pool: descriptor_pool.DescriptorPool | None) -> dict[str, Any]:
    # The upstream's own types first, then the standard ones (google.rpc.*) that this
    # process always knows.
    for candidate in (pool, None) if pool is not None else (None,):
        try:
            return json_format.MessageToDict(packed, descriptor_pool=candidate)
        except (TypeError, KeyError, json_format.Error):
            continue
    # A detail type this gateway does not know: keep it, opaque.
    return {"@type": packed.type_url, "value": base64.b64encode(packed.value).decode()}
