"""Key material: the JWT signing key, the page-token secret and the keys that seal
secrets at rest.

Loaded from settings; in development and sandbox mode, generated on first run and kept in
the data directory (mode 0600) so that restarts keep sessions and page tokens valid.
Production mode never generates (settings validation refuses to start without them).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from server.domain.identity.tokens import (
    KeySet,
    generate_private_key_pem,
    load_private_key,
    load_public_keys,
)
from server.settings import Settings, SettingsError
from server.storage import sealing


@dataclass(frozen=True, slots=True)
class KeyMaterial:
    """Everything secret the server needs at start-up."""

    jwt_keys: KeySet
    page_token_secret: bytes
    #: Keys sealing secrets at rest; the first seals.
    secrets_keys: tuple[bytes, ...]


def _read_or_create(path: Path, make: bytes) -> bytes:
    if path.exists():
        return path.read_bytes()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # the data dir: ours alone
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(make)
    return make


def load(settings: Settings) -> KeyMaterial:
    """The key material for ``settings``."""
    if settings.jwt_private_key:
        pem = settings.jwt_private_key.encode()
    elif settings.jwt_private_key_file:
        pem = Path(settings.jwt_private_key_file).read_bytes()
    else:
        pem = _read_or_create(settings.data_dir / "jwt-signing-key.pem", generate_private_key_pem())
    try:
        private_key = load_private_key(pem)
    except ValueError as exc:
        raise SettingsError(f"TP_JWT_PRIVATE_KEY: {exc}") from None
    retired = (
        load_public_keys(Path(settings.jwt_verify_keys_file).read_bytes())
        if settings.jwt_verify_keys_file
        else []
    )
    if settings.page_token_secret:
        page_secret = settings.page_token_secret.encode()
    else:
        page_secret = _read_or_create(
            settings.data_dir / "page-token.key", secrets.token_hex(32).encode()
        )
    text = (
        settings.secrets_key
        or _read_or_create(settings.data_dir / "secrets.key", sealing.new_key().encode()).decode()
    )
    try:
        sealing_keys = sealing.parse_keys(text)
    except ValueError as exc:
        raise SettingsError(f"TP_SECRETS_KEY: {exc}") from None
    return KeyMaterial(KeySet.build(private_key, retired), page_secret, sealing_keys)
