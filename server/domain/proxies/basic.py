"""Basic access: a web client's user name and password checked against a tunnel's.

Both are compared as stored, in normalization form C. The user name is compared in
constant time and the password by its Argon2id hash even when the user name is wrong, so
the time taken tells neither apart. Wrong guesses are throttled as sign-ins are
(:mod:`server.domain.identity.throttle`, under keys of their own), the tunnel standing for
the account: after a few, each further guess at a tunnel waits, from any address (1 s,
2 s, ... up to a minute), and an address that keeps guessing is locked out. A guess that
must wait is refused before its password is checked (``RESOURCE_EXHAUSTED``), so while a
tunnel's password is being guessed, checks that reach the control plane may be refused
too: decisions the proxies hold keep serving their clients meanwhile.
"""

from __future__ import annotations

import hmac

from server.domain.proxies.model import BasicCredentials
from server.domain.proxies.ports import AttemptThrottle, PasswordCheck
from server.domain.tunnels.model import Tunnel
from server.domain.tunnels.web_access import MAX_BASIC_PASSWORD, MAX_BASIC_USERNAME, normalized


class BasicCheck:
    """Checks basic credentials against a tunnel's, throttling wrong guesses."""

    def __init__(self, hasher: PasswordCheck, throttle: AttemptThrottle) -> None:
        self._hasher = hasher
        self._throttle = throttle

    async def admits(self, tunnel: Tunnel, offered: BasicCredentials, client_ip: str) -> bool:
        """Whether ``offered`` are the user name and password of ``tunnel``, for a web
        client at ``client_ip``; ``RESOURCE_EXHAUSTED`` while guesses must wait."""
        username, password = normalized(offered.username), normalized(offered.password)
        if len(username) > MAX_BASIC_USERNAME or len(password) > MAX_BASIC_PASSWORD:
            return False  # longer than any a tunnel holds: wrong, with no hash to spend
        await self._throttle.check(tunnel.id, client_ip)
        config = tunnel.config
        same_name = hmac.compare_digest(username.encode(), config.basic_username.encode())
        same_password = await self._hasher.verify(config.basic_password_hash or None, password)
        if same_name and same_password:
            await self._throttle.succeeded(tunnel.id, client_ip)
            return True
        await self._throttle.failed(tunnel.id, client_ip)
        return False
