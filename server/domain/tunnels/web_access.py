"""What a tunnel's web access must hold: the networks of an allowlist, and the user name
and password of basic access (the password kept only as its hash). Pure functions, no I/O.

Each mode's fields are empty with the other modes, so leaving a mode clears its fields in
the same update; the basic password's hash is dropped on its own, as no request can carry
one. User name and password are compared in Unicode normalization form C, as RFC 7617
asks of both: they are stored so, and what a web client sends is normalized the same way.
"""

from __future__ import annotations

import unicodedata
from dataclasses import replace

from server.domain.common import validation
from server.domain.common.addresses import parse_network
from server.domain.common.errors import Violations
from server.domain.tunnels.model import TunnelConfig, WebAccess

MAX_ALLOWED_NETWORKS = 50
MAX_BASIC_USERNAME = 64
MIN_BASIC_PASSWORD, MAX_BASIC_PASSWORD = validation.MIN_PASSWORD, validation.MAX_PASSWORD


def check_web_access(config: TunnelConfig, prefix: str, violations: Violations) -> TunnelConfig:
    """The config with its web access cleaned (:func:`check_networks`, :func:`check_basic`);
    ``prefix`` is the config's field path (``tunnel.config.``)."""
    networks = check_networks(config, prefix + "allowed_networks", violations)
    return check_basic(replace(config, allowed_networks=networks), prefix, violations)


def check_networks(config: TunnelConfig, field: str, violations: Violations) -> tuple[str, ...]:
    """The allowed networks normalized (``10.0.0.0/8``, ``203.0.113.7/32``), each once:
    1-50 CIDRs or addresses with ``IP_ALLOWLIST``, none otherwise."""
    given = config.allowed_networks
    if config.web_access is not WebAccess.IP_ALLOWLIST:
        if given:
            violations.add(field, "must be empty unless web_access is IP_ALLOWLIST")
        return ()
    if not 1 <= len(given) <= MAX_ALLOWED_NETWORKS:
        violations.add(field, f"IP_ALLOWLIST needs 1-{MAX_ALLOWED_NETWORKS} networks")
        return ()
    cleaned: list[str] = []
    for index, text in enumerate(given):
        try:
            cleaned.append(str(parse_network(text)))
        except ValueError:
            violations.add(f"{field}[{index}]", "must be a CIDR (10.0.0.0/8) or an IP address")
    return tuple(dict.fromkeys(cleaned))


def check_basic(config: TunnelConfig, prefix: str, violations: Violations) -> TunnelConfig:
    """With ``BASIC``: a user name, and a password (a new one, or else the stored hash),
    both normalized; with any other web access, neither, and no hash."""
    name_field, password_field = prefix + "basic_username", prefix + "basic_password"
    if config.web_access is not WebAccess.BASIC:
        given = {name_field: config.basic_username, password_field: config.basic_password}
        for field in (name for name, value in given.items() if value):
            violations.add(field, "must be empty unless web_access is BASIC")
        return replace(config, basic_username="", basic_password="", basic_password_hash="")
    username = basic_username(config.basic_username, name_field, violations)
    password = normalized(config.basic_password)
    if password:
        basic_password(password, username, password_field, violations)
    elif not config.basic_password_hash:
        violations.add(password_field, "is required to make the tunnel BASIC", "REQUIRED")
    return replace(config, basic_username=username, basic_password=password)


def basic_username(value: str, field: str, violations: Violations) -> str:
    """The user name, normalized: 1-64 printable characters, no ``:`` (it ends the user
    name in the header) and no space at either end."""
    name = normalized(value)
    if not name:
        violations.add(field, "is required with WEB_ACCESS_BASIC", "REQUIRED")
    elif len(name) > MAX_BASIC_USERNAME:
        violations.add(field, f"must be at most {MAX_BASIC_USERNAME} characters")
    elif ":" in name:
        violations.add(field, "must not contain ':'")
    elif not name.isprintable() or name != name.strip():
        violations.add(field, "must be printable characters, with no space at either end")
    return name


def basic_password(value: str, username: str, field: str, violations: Violations) -> None:
    """A new basic password: 10-128 printable characters (spaces too), not the user name."""
    if not MIN_BASIC_PASSWORD <= len(value) <= MAX_BASIC_PASSWORD:
        violations.add(field, f"must be {MIN_BASIC_PASSWORD}-{MAX_BASIC_PASSWORD} characters")
    elif not value.isprintable():
        violations.add(field, "must be printable characters")
    elif value == username:
        violations.add(field, "must not be the user name")
    elif len(set(value)) < 3:
        violations.add(field, "is too repetitive")


def normalized(text: str) -> str:
    """``text`` in Unicode normalization form C."""
    return unicodedata.normalize("NFC", text)


def with_stored_hash(config: TunnelConfig, stored: TunnelConfig) -> TunnelConfig:
    """``config`` (a request's, merged) with the stored password's hash, which no request
    carries: an update that replaces the whole config keeps the password it leaves out."""
    return replace(config, basic_password_hash=stored.basic_password_hash)


def sealed(config: TunnelConfig, password_hash: str) -> TunnelConfig:
    """``config`` with its new password replaced by ``password_hash``: what is stored."""
    return replace(config, basic_password="", basic_password_hash=password_hash)
