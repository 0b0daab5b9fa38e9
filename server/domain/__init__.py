"""Business rules, one package per aggregate. Imports neither grpc nor SQLAlchemy.

Each aggregate package (``identity``, ``tunnels``, ``webhooks``, ``limits``, ``events``,
``operations``, ``audit``) has the same small set of modules:

- ``model``: its entities, states and values, as frozen dataclasses and enums;
- ``rules``: pure functions (validation, state machines, names); a large aggregate adds
  pure modules named after their concept (``tunnels.endpoints``, ``tunnels.traffic``);
- ``service``: its use cases, what a servicer calls; split into modules named after their
  concept when one would pass ~450 lines (``identity.accounts``, ``identity.api_keys``);
- ``ports``: the protocols of the storage and shared state it needs.

``common`` is the shared kernel (ids, resource names, clock, listing, field masks,
validation, addresses, errors); ``unit_of_work`` gathers every aggregate's repositories in
one transaction. A request's path reads the same at every step: ``TunnelService.StartTunnel``
-> ``server/api/tunnels.py`` ``StartTunnel`` -> ``tunnels/service.py`` ``start`` -> the
repository in ``server/storage/tunnels/``.

The layering (``tests/unit/test_layering.py`` checks it, ``TYPE_CHECKING`` imports
included):

1. Nothing here imports grpc, google (protobuf, rpc), SQLAlchemy or Redis, nor any part of
   ``server`` outside ``server.domain`` (storage, api, interceptors, settings, ...).
2. ``common`` imports no aggregate and not the unit of work.
3. An aggregate reaches another only through what that one publishes: its ``model``,
   ``ports`` and ``rules``, and the modules its ``__init__`` names in ``PUBLISHED``
   (``events.service``: every use case records its events; ``audit.service``: and
   records its audit entry; ``identity.tiers``; ``webhooks.outbox``: an event's
   deliveries are queued with it; ``tunnels.web_access``: the proxies' basic check
   compares credentials as the tunnel's rules store them).
4. ``model`` and ``ports`` modules import only pure modules: nothing that reaches a
   unit of work or a ``ports`` module. So a repository protocol never depends on a use case.
5. The domain's import graph has no cycle.
"""
