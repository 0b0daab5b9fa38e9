"""Property 3: permission enforcement consistency (server/domain/identity/rules.py).

``authorize`` agrees with a reference predicate written here from the documented rules,
and obeys the laws that make it safe to reason about: more permissions never hurt,
owners never need the admin permission, and super_admin can do whatever any role can.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.domain.common.errors import PermissionDenied, Unauthenticated
from server.domain.identity.model import CredentialKind, Principal, Role, Tier
from server.domain.identity.rules import (
    ADMIN_PERMISSIONS,
    AGENT_PERMISSIONS,
    ALL_PERMISSIONS,
    KEY_ONLY_ROLES,
    ROLE_PERMISSIONS,
    SELF_PERMISSIONS,
    Rule,
    authorize,
    is_agent_key,
    permissions_for,
)

Outcome = Literal["allow", "unauthenticated", "denied"]
TIER_ORDER = [Tier.FREE, Tier.PREMIUM, Tier.ENTERPRISE]
USERS = ["usr_a", "usr_b"]
# Every real permission plus a few that no role grants.
UNIVERSE = sorted(ALL_PERMISSIONS | {"tunnels.write", "unknown.perm"})

permission_sets = st.frozensets(st.sampled_from(UNIVERSE))
rules = st.builds(
    Rule,
    public=st.booleans(),
    permission=st.sampled_from(["", *UNIVERSE]),
    owner_field=st.sampled_from(["", "name", "parent"]),
    admin_permission=st.sampled_from(["", *UNIVERSE]),
    min_tier=st.none() | st.sampled_from(Tier),
    credentials=st.frozensets(st.sampled_from(CredentialKind)),
)
principals = st.builds(
    Principal,
    user_id=st.sampled_from(USERS),
    role=st.sampled_from(Role),
    tier=st.sampled_from(Tier),
    credential=st.sampled_from(CredentialKind),
    permissions=permission_sets,
)
owners = st.none() | st.sampled_from(USERS)


def outcome(rule: Rule, principal: Principal | None, owner_id: str | None) -> Outcome:
    try:
        authorize(rule, principal, owner_id)
    except Unauthenticated:
        return "unauthenticated"
    except PermissionDenied:
        return "denied"
    return "allow"


def reference(rule: Rule, principal: Principal | None, owner_id: str | None) -> Outcome:
    """The rules as documented, written independently of the implementation."""
    if principal is None:
        return "allow" if rule.public else "unauthenticated"
    held = principal.permissions
    for_someone_else = rule.owner_field != "" and owner_id != principal.user_id
    checks = [
        principal.credential in rule.credentials,
        rule.permission == "" or rule.permission in held,
        not for_someone_else or (rule.admin_permission != "" and rule.admin_permission in held),
        # The tier is about the caller's own plan; administrators acting for others skip it.
        for_someone_else
        or rule.min_tier is None
        or TIER_ORDER.index(principal.tier) >= TIER_ORDER.index(rule.min_tier),
    ]
    return "allow" if all(checks) else "denied"


@given(rule=rules, principal=st.none() | principals, owner_id=owners)
def test_decision_equals_the_reference(
    rule: Rule, principal: Principal | None, owner_id: str | None
) -> None:
    assert outcome(rule, principal, owner_id) == reference(rule, principal, owner_id)


@given(rule=rules, principal=principals, owner_id=owners, extra=permission_sets)
def test_more_permissions_never_turn_allow_into_deny(
    rule: Rule, principal: Principal, owner_id: str | None, extra: frozenset[str]
) -> None:
    richer = replace(principal, permissions=principal.permissions | extra)
    if outcome(rule, principal, owner_id) == "allow":
        assert outcome(rule, richer, owner_id) == "allow"


@given(rule=rules, owner_id=owners)
def test_anonymous_is_unauthenticated_exactly_when_the_method_is_not_public(
    rule: Rule, owner_id: str | None
) -> None:
    assert outcome(rule, None, owner_id) == ("allow" if rule.public else "unauthenticated")


@given(rule=rules, principal=principals, admin=st.sampled_from(["", *UNIVERSE]))
def test_owners_never_need_the_admin_permission(
    rule: Rule, principal: Principal, admin: str
) -> None:
    own = principal.user_id
    decision = outcome(rule, principal, own)
    assert outcome(replace(rule, admin_permission=admin), principal, own) == decision
    assert outcome(replace(rule, owner_field=""), principal, own) == decision
    if rule.admin_permission != rule.permission:
        without = replace(principal, permissions=principal.permissions - {rule.admin_permission})
        assert outcome(rule, without, own) == decision


@given(
    rule=rules,
    user_id=st.sampled_from(USERS),
    tier=st.sampled_from(Tier),
    credential=st.sampled_from(CredentialKind),
    scopes=st.none() | permission_sets,
    owner_id=owners,
)
def test_super_admin_is_allowed_whenever_any_role_is(
    rule: Rule,
    user_id: str,
    tier: Tier,
    credential: CredentialKind,
    scopes: frozenset[str] | None,
    owner_id: str | None,
) -> None:
    def as_role(role: Role) -> Principal:
        return Principal(user_id, role, tier, credential, permissions_for(role, scopes))

    if any(outcome(rule, as_role(role), owner_id) == "allow" for role in Role):
        assert outcome(rule, as_role(Role.SUPER_ADMIN), owner_id) == "allow"


@given(role=st.sampled_from(Role), scopes=st.none() | permission_sets)
def test_role_permissions_are_known_and_keys_only_narrow_them(
    role: Role, scopes: frozenset[str] | None
) -> None:
    granted = permissions_for(role, scopes)
    assert ROLE_PERMISSIONS[role] <= ALL_PERMISSIONS
    if is_agent_key(scopes):  # an agent key acts with the agent role, whoever owns it
        assert granted == AGENT_PERMISSIONS
        return
    assert granted <= ROLE_PERMISSIONS[role]
    if scopes:
        assert granted <= scopes
    else:
        assert granted == ROLE_PERMISSIONS[role]


def test_every_role_has_permissions_and_the_catalogue_is_consistent() -> None:
    assert set(ROLE_PERMISSIONS) == set(Role)
    assert ROLE_PERMISSIONS[Role.SUPER_ADMIN] == ALL_PERMISSIONS
    assert ALL_PERMISSIONS == SELF_PERMISSIONS | ADMIN_PERMISSIONS | AGENT_PERMISSIONS
    assert {Role.SERVICE, Role.AGENT} == KEY_ONLY_ROLES
    # Only super_admin may change other users' roles and state.
    assert [r for r in Role if "users.admin" in ROLE_PERMISSIONS[r]] == [Role.SUPER_ADMIN]
    assert [t.rank for t in TIER_ORDER] == [0, 1, 2]


USER = Principal("usr_a", Role.USER, Tier.FREE, CredentialKind.SESSION, SELF_PERMISSIONS)


@pytest.mark.parametrize(
    ("rule", "principal", "owner_id", "reason", "metadata"),
    [
        (Rule(public=False), None, None, "CREDENTIALS_MISSING", {}),
        (
            Rule(public=False, credentials=frozenset({CredentialKind.API_KEY})),
            USER,
            None,
            "CREDENTIAL_KIND_NOT_ALLOWED",
            {},
        ),
        (
            Rule(public=False, permission="billing.write"),
            USER,
            None,
            "PERMISSION_MISSING",
            {"permission": "billing.write"},
        ),
        (
            Rule(public=False, owner_field="name", admin_permission="users.read"),
            USER,
            "usr_b",
            "NOT_OWNER",
            {"permission": "users.read"},
        ),
        (Rule(public=False, owner_field="name"), USER, "usr_b", "NOT_OWNER", {}),
        (
            Rule(public=False, min_tier=Tier.PREMIUM),
            USER,
            None,
            "TIER_TOO_LOW",
            {"required_tier": "premium", "tier": "free"},
        ),
    ],
)
def test_refusals_carry_a_reason_and_metadata(
    rule: Rule,
    principal: Principal | None,
    owner_id: str | None,
    reason: str,
    metadata: dict[str, str],
) -> None:
    with pytest.raises((Unauthenticated, PermissionDenied)) as caught:
        authorize(rule, principal, owner_id)
    assert caught.value.reason == reason
    assert caught.value.metadata == metadata
