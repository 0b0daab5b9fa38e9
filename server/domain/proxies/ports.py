"""What proxies' use cases need besides the unit of work: a user's share of a tunnel, as
the tunnels' sharing rules count it; for basic access, a password check and a throttle of
wrong guesses; where proxy resources are stored; and a provisioner that runs their
instances (local child processes, or a Kubernetes Deployment)."""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

from server.domain.common.listing import ListQuery
from server.domain.identity.model import ShareRole
from server.domain.proxies.model import (
    ConfigRevision,
    Instance,
    Pool,
    Proxy,
    ScalingEvent,
)
from server.domain.tunnels.model import Tunnel


class TunnelLookup(Protocol):
    """Tunnels by id (the tunnels' ``TunnelCache`` provides it: cached, invalidated by the
    tunnels' events)."""

    async def get(self, tunnel_id: str) -> Tunnel | None:
        """The tunnel, or None when there is none."""
        ...


class ShareLookup(Protocol):
    """A user's share of a tunnel (the tunnels' ``ShareService`` provides it)."""

    async def share_role(self, resource: str, user_id: str) -> ShareRole:
        """The share role of ``user_id`` on the tunnel ``resource`` names, as it counts now:
        NONE without a share, or once it (or a share it was granted through) has ended."""
        ...


class ProxyRepository(Protocol):
    """Proxies with their config history and scaling events."""

    async def get(self, proxy_id: str, *, lock: bool = False) -> Proxy | None: ...
    async def find_by_request(self, user_id: str, request_id: str) -> Proxy | None: ...
    async def lock_owner(self, user_id: str) -> None: ...
    async def count_active(self, user_id: str) -> int: ...
    async def add(self, proxy: Proxy) -> None: ...
    async def save(self, proxy: Proxy, expected_version: int) -> Proxy: ...
    async def save_instances(
        self, proxy_id: str, instances: Sequence[Instance], last_active_time: datetime
    ) -> None:
        """Write the instances' bookkeeping and the last activity, the version kept (health
        checks are not changes an etag guards)."""
        ...

    async def list(self, user_id: str, query: ListQuery) -> builtins.list[Proxy]: ...
    async def active(self, user_id: str = "") -> builtins.list[Proxy]:
        """Proxies not stopped or failed: of ``user_id``, or ("") of every user."""
        ...

    async def add_revision(self, revision: ConfigRevision) -> None: ...
    async def revision(self, proxy_id: str, version: int) -> ConfigRevision | None: ...
    async def revisions(self, proxy_id: str, query: ListQuery) -> builtins.list[ConfigRevision]: ...
    async def add_scaling_event(self, event: ScalingEvent) -> None: ...
    async def scaling_events(
        self, proxy_id: str, query: ListQuery
    ) -> builtins.list[ScalingEvent]: ...
    async def last_scaling(
        self, proxy_id: str, applied_only: bool = True
    ) -> ScalingEvent | None: ...


class Provisioner(Protocol):
    """Runs proxies' instances somewhere: declarative, idempotent calls."""

    #: "local" or "kubernetes", as reported in diagnostics.
    kind: str

    async def apply(self, pool: Pool, admin_token: str) -> Sequence[Instance]:
        """Run ``pool.replicas`` instances of the proxy with its config (starting or
        stopping some as needed, pushing nothing live: the caller does that through each
        instance's admin URL); the instances placed now, some perhaps still starting.
        ``admin_token`` is what the instances require on their admin URL."""
        ...

    async def restart(self, proxy_id: str, instance_id: str) -> Instance | None:
        """Replace one instance (a new one takes its place); None if there is no such
        instance."""
        ...

    async def remove(self, proxy_id: str) -> None:
        """Stop every instance of the proxy; nothing to do if there is none."""
        ...

    async def instances(self, proxy_id: str) -> Sequence[Instance]:
        """The instances placed for the proxy now."""
        ...

    async def close(self) -> None:
        """Let go of what the provisioner holds (local: stop every child)."""
        ...


class InstanceUnreachableError(Exception):
    """An instance's admin side did not answer as it should; the message says how."""


class InstanceAdmin(Protocol):
    """The instances' admin sides (``proxy/admin.py``), as the control plane reads them."""

    async def get(
        self, proxy: Proxy, instance: Instance, path: str, within: float | None = None
    ) -> dict[str, Any]:
        """The JSON object an admin path answers; :class:`InstanceUnreachableError`
        otherwise."""


class PasswordCheck(Protocol):
    """Verification of a password against its hash (identity's Argon2id hasher)."""

    async def verify(self, stored_hash: str | None, password: str) -> bool:
        """Whether ``password`` matches; with no hash, the same time spent and False.
        ``RESOURCE_EXHAUSTED`` when the hasher is busy."""
        ...


class AttemptThrottle(Protocol):
    """Spaces out password guesses per account, address and both (identity's throttle)."""

    async def check(self, account: str, address: str, /) -> None:
        """``RESOURCE_EXHAUSTED`` while an attempt for ``account`` from ``address`` must wait."""
        ...

    async def failed(self, account: str, address: str, /) -> None:
        """Count a wrong guess."""
        ...

    async def succeeded(self, account: str, address: str, /) -> None:
        """Clear the account's failures from this address."""
        ...
