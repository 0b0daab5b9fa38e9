"""The composition root's areas (:class:`server.app.App` builds them): one module per area,
each of the same shape.

``build(...)`` makes the area's collaborators from the settings and the areas it depends
on, passing every one in through constructors; the area it returns names its background
loops (``loops()``, run by :class:`server.workers.supervisor.Supervisor`) and releases what
it holds (``aclose()``). The root builds them in dependency order:

- ``infrastructure``: database, Redis, shared state, metrics registry, tracing, listing
- ``events``: the event log and the bus every replica hears (its Redis reader)
- ``identity``: accounts, users, tokens, API keys, sign-in, tiers (the purge of users)
- ``limits``: limiter, load, quotas, usage, violations (sampling, roll-up, flushes)
- ``tunnels``: tunnels, shares, agents, endpoint probes (agent sweep, prober)
- ``webhooks``: endpoints and the dispatcher (claims, records, header sealing)
- ``operations``: long-running operations and their runner
- ``health``: dependency health and the status AdminService reports
- ``api``: the servicers and the call pipeline both transports run
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from server.workers.supervisor import Loop


class Area(Protocol):
    """What the root asks of every area once it is built."""

    def loops(self) -> Sequence[Loop]:
        """Its background loops, in the order to start them."""
        ...

    async def aclose(self) -> None:
        """Release its connections (after its loops have stopped)."""
        ...
