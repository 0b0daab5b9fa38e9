"""Property 14 (admin audit consistency): for any sequence of admin actions (suspend,
reactivate, role and tier changes, with their reasons, on a few users, no-ops included),
the audit log holds exactly one entry per action, in the order made, each naming the
action, its subject and its reason, in increasing chain positions; and the day's chain
is intact afterwards. Over gRPC, on both databases."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tunnelplane.v1 import audit_pb2, common_pb2, users_pb2

from server.domain.identity.model import Role
from tests.helpers import Client, TestUser

U = users_pb2


@dataclass(frozen=True)
class Action:
    kind: str  # suspend_user, reactivate_user, set_user_role, change_tier
    target: int
    value: int
    reason: str


reasons = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp")),
    min_size=1,
    max_size=40,
).filter(lambda r: r.strip() == r and r != "")
actions = st.lists(
    st.builds(
        Action,
        st.sampled_from(["suspend_user", "reactivate_user", "set_user_role", "change_tier"]),
        st.integers(0, 1),
        st.integers(0, 1),
        reasons,
    ),
    min_size=1,
    max_size=6,
)
ROLES = (common_pb2.ROLE_USER, common_pb2.ROLE_SUPPORT_ADMIN)
TIERS = (common_pb2.TIER_FREE, common_pb2.TIER_PREMIUM)


async def act(client: Client, admin: TestUser, target: TestUser, action: Action) -> None:
    meta, name = admin.metadata, target.name
    if action.kind == "suspend_user":
        await client.users.SuspendUser(
            U.SuspendUserRequest(name=name, reason=action.reason), metadata=meta
        )
    elif action.kind == "reactivate_user":
        await client.users.ReactivateUser(
            U.ReactivateUserRequest(name=name, reason=action.reason), metadata=meta
        )
    elif action.kind == "set_user_role":
        await client.users.SetUserRole(
            U.SetUserRoleRequest(name=name, role=ROLES[action.value], reason=action.reason),
            metadata=meta,
        )
    else:
        await client.users.ChangeTier(
            U.ChangeTierRequest(name=name, tier=TIERS[action.value], reason=action.reason),
            metadata=meta,
        )


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(sequence=actions)
async def test_admin_actions_leave_exactly_their_entries_in_order(
    client: Client, sequence: list[Action]
) -> None:
    admin = await client.new_user(role=Role.SUPER_ADMIN, tag="p14")
    targets = [await client.new_user(tag="p14t") for _ in range(2)]
    for action in sequence:
        await act(client, admin, targets[action.target], action)
    found = await client.audit.ListAuditEntries(
        audit_pb2.ListAuditEntriesRequest(
            filter=f'actor = "{admin.id}" AND action : "users."', page_size=100
        ),
        metadata=admin.metadata,
    )
    entries = list(reversed(found.entries))  # oldest first
    assert [(e.action, e.subject, e.details["reason"], e.outcome) for e in entries] == [
        (f"users.{a.kind}", targets[a.target].name, a.reason, "OK") for a in sequence
    ]
    positions = [(e.chain_day, e.chain_sequence) for e in entries]
    assert positions == sorted(positions)
    assert len(set(positions)) == len(positions)
    verified = await client.audit.VerifyAuditLog(
        audit_pb2.VerifyAuditLogRequest(), metadata=admin.metadata
    )
    assert verified.intact, verified.first_break
