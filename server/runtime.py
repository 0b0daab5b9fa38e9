"""Process-level tuning for a long-running server."""

from __future__ import annotations

import gc

#: Allocations between young-generation collections (CPython's default is 700).
GEN0_THRESHOLD = 20_000


def tune_gc() -> None:
    """Call once start-up is done: move every object made so far out of the collector's
    view (it is long-lived: modules, descriptors, the composition root) and collect the
    young generation less often. A server allocates many short-lived objects per call;
    with the default threshold the collector runs every few calls."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
