"""What proxies' use cases need besides the unit of work (whose tunnel repository they
read): a user's share of a tunnel, as the tunnels' sharing rules count it; and, for basic
access, a password check and a throttle of wrong guesses."""

from __future__ import annotations

from typing import Protocol

from server.domain.identity.model import ShareRole


class ShareLookup(Protocol):
    """A user's share of a tunnel (the tunnels' ``ShareService`` provides it)."""

    async def share_role(self, resource: str, user_id: str) -> ShareRole:
        """The share role of ``user_id`` on the tunnel ``resource`` names, as it counts now:
        NONE without a share, or once it (or a share it was granted through) has ended."""
        ...


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
