"""Reads each method's ``(tunnelplane.v1.policy)`` option from the descriptors.

A method without a policy, or with one that does not make sense (unknown permission,
owner field that does not exist), stops the server at start-up: nothing is open by
accident.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from tunnelplane.v1 import common_pb2, options_pb2

from server.domain.principal import ALL_PERMISSIONS, CredentialKind, Rule, ShareRole, Tier

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
    credentials = frozenset(_CREDENTIALS[c] for c in raw.credentials) or frozenset(CredentialKind)
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
    )


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
