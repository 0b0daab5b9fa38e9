"""The agent's stable id: given, stored at install time, or derived from host and tunnel."""

from __future__ import annotations

import hashlib
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path

#: What the control plane accepts as an agent id.
AGENT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def id_file(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/tunnelplane/agent-id``, by default ``~/.config/tunnelplane/agent-id``."""
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "tunnelplane" / "agent-id"


def derived_agent_id(hostname: str, tunnel: str) -> str:
    """An id that stays the same for one host and tunnel: the short host name and a hash."""
    digest = hashlib.sha256(f"{hostname}\n{tunnel}".encode()).hexdigest()[:12]
    short = re.sub(r"[^A-Za-z0-9._-]", "-", hostname.split(".", 1)[0])[:40] or "agent"
    return f"{short}-{digest}"


def check_agent_id(agent_id: str) -> str:
    """Return ``agent_id``, or raise ValueError when the control plane would refuse it."""
    if not AGENT_ID.fullmatch(agent_id):
        raise ValueError(f"agent id must be 1-64 characters of [A-Za-z0-9._-]: {agent_id!r}")
    return agent_id


def resolve_agent_id(explicit: str | None, tunnel: str, path: Path | None = None) -> str:
    """The id given, else the one stored in ``path`` (:func:`id_file`), else a derived one."""
    if explicit is not None:
        return check_agent_id(explicit)
    path = id_file() if path is None else path
    try:
        stored = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return derived_agent_id(socket.gethostname(), tunnel)
    return check_agent_id(stored)
