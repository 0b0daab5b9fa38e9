"""Reads each method's ``(tunnelplane.v1.policy)`` option from the descriptors.

A method without a policy, or with one that does not make sense (unknown permission,
owner field that does not exist), stops the server at start-up: nothing is open by
accident.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from google.api import annotations_pb2, http_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from tunnelplane.v1 import common_pb2, options_pb2

from server.domain.identity.model import CredentialKind, ShareRole, Tier, TierLimits
from server.domain.identity.rules import ALL_PERMISSIONS, Rule

#: The tier limits a streaming method may name as its ``stream_limit``.
STREAM_LIMITS = frozenset(
    f.name for f in dataclasses.fields(TierLimits) if f.name.endswith("_streams")
)

_TIERS = {
    common_pb2.TIER_FREE: Tier.FREE,
    common_pb2.TIER_PREMIUM: Tier.PREMIUM,
    common_pb2.TIER_ENTERPRISE: Tier.ENTERPRISE,
}
_CREDENTIALS = {
    options_pb2.CREDENTIAL_KIND_SESSION: CredentialKind.SESSION,
    options_pb2.CREDENTIAL_KIND_API_KEY: CredentialKind.API_KEY,
}


class PolicyError(RuntimeError):
    """A method's policy is missing or invalid."""


@dataclass(frozen=True, slots=True)
class MethodPolicy:
    """Everything a method's policy says, in domain terms."""

    rule: Rule
    audited: bool = False
    critical: bool = False
    rate_cost: int = 1
    rate_exempt: bool = False
    #: Not counted against (nor refused by) the monthly request quota.
    quota_free: bool = False
    require_tls: bool = False
    #: The tier limit capping the caller's open streams of this method ("" if none).
    stream_limit: str = ""
    #: The access cookie may authenticate the call (a safe, read-only stream).
    cookie_auth: bool = False
    #: Safe: every HTTP binding is a GET, so the method changes nothing and may run again.
    safe: bool = False


def policy_of(method: MethodDescriptor) -> MethodPolicy:
    """The validated policy of one method."""
    name = method.full_name
    options = method.GetOptions()
    if not options.HasExtension(options_pb2.policy):
        raise PolicyError(f"{name} declares no (tunnelplane.v1.policy); refusing to start")
    raw = options.Extensions[options_pb2.policy]
    if raw.access == options_pb2.ACCESS_UNSPECIFIED:
        raise PolicyError(f"{name}: policy.access is unspecified")
    for permission in (raw.permission, raw.admin_permission):
        if permission and permission not in ALL_PERMISSIONS:
            raise PolicyError(f"{name}: unknown permission {permission!r}")
    if raw.owner_field:
        _check_owner_field(name, method.input_type, raw.owner_field)
    if raw.access == options_pb2.ACCESS_PUBLIC and (raw.permission or raw.owner_field):
        raise PolicyError(f"{name}: a public method cannot require a permission or an owner")
    if raw.share_role and not raw.owner_field:
        raise PolicyError(f"{name}: share_role needs an owner_field naming the shared resource")
    _check_stream_limit(method, raw.stream_limit)
    credentials = frozenset(_CREDENTIALS[c] for c in raw.credentials) or frozenset(CredentialKind)
    if raw.cookie_auth:
        _check_cookie_auth(method, raw, credentials)
    rule = Rule(
        public=raw.access == options_pb2.ACCESS_PUBLIC,
        permission=raw.permission,
        owner_field=raw.owner_field,
        admin_permission=raw.admin_permission,
        min_tier=_TIERS.get(raw.min_tier),
        credentials=credentials,
        share_role=ShareRole(raw.share_role),
    )
    return MethodPolicy(
        rule=rule,
        audited=raw.audited,
        critical=raw.critical,
        rate_cost=raw.rate_limit.cost or 1,
        rate_exempt=raw.rate_limit.exempt,
        quota_free=raw.rate_limit.quota_free,
        require_tls=raw.require_tls,
        stream_limit=raw.stream_limit,
        cookie_auth=raw.cookie_auth,
        safe=_safe(method),
    )


def _safe(method: MethodDescriptor) -> bool:
    rules = _http_rules(method)
    return bool(rules) and all(rule.WhichOneof("pattern") == "get" for rule in rules)


def _check_stream_limit(method: MethodDescriptor, limit: str) -> None:
    if not limit:
        return
    if limit not in STREAM_LIMITS:
        known = ", ".join(sorted(STREAM_LIMITS))
        raise PolicyError(f"{method.full_name}: unknown stream_limit {limit!r}; known: {known}")
    if not (method.server_streaming or method.client_streaming):
        raise PolicyError(f"{method.full_name}: stream_limit applies to streaming methods only")


def _check_cookie_auth(
    method: MethodDescriptor, raw: options_pb2.Policy, credentials: frozenset[CredentialKind]
) -> None:
    """A cookie is sent by the browser on its own (a forged page's request included): it
    may only authenticate what is safe to do on anyone's behalf, reading a stream."""
    name = method.full_name
    if not method.server_streaming or method.client_streaming:
        raise PolicyError(f"{name}: cookie_auth is for server-streaming (read-only) methods only")
    verbs = {rule.WhichOneof("pattern") for rule in _http_rules(method)}
    if verbs - {"get"}:
        raise PolicyError(f"{name}: cookie_auth needs every HTTP binding to be a GET")
    if raw.access != options_pb2.ACCESS_AUTHENTICATED:
        raise PolicyError(f"{name}: cookie_auth needs access: ACCESS_AUTHENTICATED")
    if CredentialKind.SESSION not in credentials:
        raise PolicyError(f"{name}: cookie_auth needs session credentials to be accepted")


def _http_rules(method: MethodDescriptor) -> list[http_pb2.HttpRule]:
    options = method.GetOptions()
    if not options.HasExtension(annotations_pb2.http):
        return []
    rule = options.Extensions[annotations_pb2.http]
    return [rule, *rule.additional_bindings]


def _check_owner_field(name: str, message: Descriptor, path: str) -> None:
    descriptor: Descriptor | None = message
    field: FieldDescriptor | None = None
    for part in path.split("."):
        field = descriptor.fields_by_name.get(part) if descriptor is not None else None
        if field is None:
            raise PolicyError(f"{name}: owner_field {path!r} is not a field of the request")
        descriptor = field.message_type
    if field is None or field.type != FieldDescriptor.TYPE_STRING:
        raise PolicyError(f"{name}: owner_field {path!r} must be a string field")


def load_policies(methods: Iterable[MethodDescriptor]) -> dict[str, MethodPolicy]:
    """Policies by full method name; :class:`PolicyError` if any is missing or invalid."""
    return {method.full_name: policy_of(method) for method in methods}
