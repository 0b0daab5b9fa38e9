"""A read-through cache of tunnels by id, for the lookups that dominate: the streaming
proxies ask about a tunnel on every web request (``CheckTunnelAccess``) and agents on every
link (``AuthorizeAgentLink``).

- Every committed change to a tunnel records an event whose subject is the tunnel; the bus
  brings it to every replica (Redis pub/sub), and :meth:`TunnelCache.hear` drops the entry.
- An entry lives at most ``ttl`` seconds: the bound on staleness when an event is missed
  (Redis down: the bus is then in-process only, and other replicas hear nothing).
- A read that raced with a change never stores what it read: each id has a generation,
  moved by every invalidation, and a load is stored only if the generation it started
  with is still current.
- Absent tunnels are cached too (a proxy probed with unknown ids costs no query each);
  ids are random, so none of those can be created later.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from server.domain.events.model import Event
from server.domain.tunnels.model import Tunnel
from server.domain.unit_of_work import UnitOfWorkFactory

#: Told ``hit`` or ``miss`` for each lookup.
Count = Callable[[str], None]
MAX_ENTRIES = 50_000


class TunnelCache:
    """Tunnels by id, invalidated by their events, each entry for ``ttl`` seconds at most."""

    def __init__(
        self,
        uow: UnitOfWorkFactory,
        ttl: float,
        count: Count,
        *,
        max_entries: int = MAX_ENTRIES,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._uow = uow
        self._ttl = ttl
        self._count = count
        self._max = max_entries
        self._now = monotonic
        self._entries: OrderedDict[str, tuple[float, Tunnel | None]] = OrderedDict()
        self._generations: dict[str, int] = {}

    async def get(self, tunnel_id: str) -> Tunnel | None:
        """The tunnel (None: there is none), from the cache when it is fresh."""
        now = self._now()
        found = self._entries.get(tunnel_id)
        if found is not None and found[0] > now:
            self._count("hit")
            return found[1]
        self._count("miss")
        generation = self._generations.get(tunnel_id, 0)
        async with self._uow(readonly=True) as uow:
            tunnel = await uow.tunnels.get(tunnel_id)
        if self._generations.get(tunnel_id, 0) == generation:
            self._entries[tunnel_id] = (now + self._ttl, tunnel)
            self._entries.move_to_end(tunnel_id)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
        return tunnel

    def invalidate(self, tunnel_id: str) -> None:
        """Forget ``tunnel_id`` now, and any load of it under way."""
        self._entries.pop(tunnel_id, None)
        self._generations[tunnel_id] = self._generations.get(tunnel_id, 0) + 1
        if len(self._generations) > self._max:
            # Loads under way for the oldest ids may store once; the TTL still bounds them.
            self._generations.pop(next(iter(self._generations)))

    def hear(self, event: Event) -> None:
        """A bus listener: an event about a tunnel (``users/{u}/tunnels/{t}...``) drops it."""
        parts = event.subject.split("/", 4)
        if len(parts) >= 4 and parts[2] == "tunnels":
            self.invalidate(parts[3])
