"""Pure rules of the audit log."""

from __future__ import annotations

import re

_WORD_START = re.compile(r"(?<!^)(?=[A-Z])")


def action_name(full_method: str) -> str:
    """``/tunnelplane.v1.AuthService/Login`` -> ``auth.login``."""
    service, _, method = full_method.strip("/").rpartition("/")
    area = service.rpartition(".")[2].removesuffix("Service").lower()
    area = {"user": "users"}.get(area, area)
    return f"{area}.{_WORD_START.sub('_', method).lower()}"
