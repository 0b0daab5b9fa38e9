"""A webhook endpoint's custom headers at rest: one JSON object sealed with AES-256-GCM
(:mod:`server.storage.sealing`), bound to its row and to being its headers.

Releases before migration 0008 kept them in the clear in ``webhooks.headers``; such rows
are read as they are and sealed at start-up (``SqlWebhookRepository.seal_plain_headers``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import sqlalchemy as sa

from server.storage.sealing import Sealer


def _headers_binding(webhook_id: str) -> str:
    """What sealed headers are bound to: their row, and that they are its headers (the
    row's sealed secret does not open as its headers, nor the other way round)."""
    return f"{webhook_id}/headers"


def seal_headers(headers: Mapping[str, str], webhook_id: str, sealer: Sealer) -> str:
    """``headers`` sealed for the row ``webhook_id``."""
    return sealer.seal(json.dumps(dict(headers), sort_keys=True), _headers_binding(webhook_id))


def open_headers(row: sa.RowMapping, sealer: Sealer) -> dict[str, str]:
    """The row's headers: the plaintext column when something other than this server wrote
    it (a release before migration 0008, a tool), else the sealed one."""
    plain = dict(row["headers"] or {})
    sealed = row["sealed_headers"]
    if plain or sealed is None:
        return plain
    opened: dict[str, str] = json.loads(sealer.open(sealed, _headers_binding(row["id"])))
    return opened
