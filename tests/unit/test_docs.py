"""The README stays true to the code: every setting is documented."""

from __future__ import annotations

from pathlib import Path

from server.settings import documented_settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_is_in_the_readme_table() -> None:
    text = README.read_text()
    for name, default, _doc in documented_settings():
        row = f"| `{name}` | {f'`{default}`' if default else ''} |"
        assert row in text, f"README settings table is missing or stale for {name}"
