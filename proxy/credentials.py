"""What a web client's ``Authorization`` header offers the proxy: a Tunnelplane credential
(``Bearer``: an access token or API key, for private tunnels), or a user name and password
(``Basic``, RFC 7617, for tunnels with basic access). Pure; property-tested.

A Bearer credential goes to the control plane as the check's own credential; Basic ones
go in the check's request, never as its credential (the control plane would refuse them as
a bad one). Basic credentials that are not base64 of UTF-8 ``user:password`` offer
nothing: a tunnel that asks for them asks again. Neither kind is logged; the control
plane's answers are cached under a SHA-256 of what was offered.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Offered:
    """The credentials of one request (empty: none of that kind)."""

    bearer: str = field(default="", repr=False)
    username: str = ""
    password: str = field(default="", repr=False)

    def digest(self) -> bytes:
        """What a cached decision is keyed by: a SHA-256 of the credentials (b"": none)."""
        if self.bearer:
            return _sha256(f"bearer:{self.bearer}")
        if self.username or self.password:
            return _sha256(f"basic:{self.username}:{self.password}")
        return b""


NOTHING = Offered()


def offered(header: str) -> Offered:
    """The credentials an ``Authorization`` header value offers."""
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return Offered(bearer=value)
    if scheme.lower() == "basic":
        return basic(value)
    return NOTHING


def basic(token: str) -> Offered:
    """The user name and password of a Basic token (base64 of ``user:password`` in UTF-8,
    the charset the proxy's challenge names); nothing if it is not one."""
    try:
        decoded = base64.b64decode(token, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return NOTHING
    username, colon, password = decoded.partition(":")
    return Offered(username=username, password=password) if colon else NOTHING


def _sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
