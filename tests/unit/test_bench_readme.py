"""`make bench` writes its results between markers in bench/README.md, after twenty minutes
of measuring: a marker lost in an edit fails the run at its very end and loses it. Every
marker a publisher writes must be there, once."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_results_marker_the_bench_writes_is_in_its_readme() -> None:
    sources = "\n".join(p.read_text() for p in (ROOT / "bench").glob("*.py"))
    written = set(re.findall(r'"((?:[a-z]+-)*results)"', sources))
    assert {"results", "limiter-results", "http-results", "webhook-results"} <= written
    readme = (ROOT / "bench" / "README.md").read_text()
    for name in sorted(written):
        assert readme.count(f"<!-- {name}:start -->") == 1, name
        assert readme.count(f"<!-- {name}:end -->") == 1, name
        assert readme.index(f"<!-- {name}:start -->") < readme.index(f"<!-- {name}:end -->")
