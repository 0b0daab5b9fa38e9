"""The alert rules name only metrics the server exports: a renamed metric fails here, not
silently in production. (promtool checks and unit-tests the rules in ``make lint``.)"""

from __future__ import annotations

import re
from pathlib import Path

from server.app import App
from tests.conftest import make_settings

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"
#: Series Prometheus makes itself.
BUILT_IN = {"up"}
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def exported(tmp_path: Path) -> set[str]:
    """Every series name the server's registry can produce (with a read replica)."""
    app = App(
        make_settings(
            tmp_path,
            database_url=f"sqlite+aiosqlite:///{tmp_path / 'db'}",
            database_replica_url=f"sqlite+aiosqlite:///{tmp_path / 'replica'}",
        )
    )
    names = set()
    for family in app.registry.collect():
        names.add(family.name)
        names.update(family.name + suffix for suffix in SUFFIXES)
    return names


def test_every_metric_in_the_alert_rules_is_exported(tmp_path: Path) -> None:
    text = RULES.read_text()
    expressions = "\n".join(re.findall(r"expr: \|?\n?((?:.|\n)*?)\n\s+(?:for|labels):", text))
    used = set(re.findall(r"\b((?:grpc_server|tunnelplane)_[a-z_]+)\b", expressions))
    assert len(used) >= 9
    missing = used - exported(tmp_path) - BUILT_IN
    assert not missing, f"alerts.yml uses metrics the server does not export: {missing}"
