"""What proxies' use cases need besides the unit of work (whose tunnel repository they
read): a user's share of a tunnel, as the tunnels' sharing rules count it."""

from __future__ import annotations

from typing import Protocol

from server.domain.identity.model import ShareRole


class ShareLookup(Protocol):
    """A user's share of a tunnel (the tunnels' ``ShareService`` provides it)."""

    async def share_role(self, resource: str, user_id: str) -> ShareRole:
        """The share role of ``user_id`` on the tunnel ``resource`` names, as it counts now:
        NONE without a share, or once it (or a share it was granted through) has ended."""
        ...
