"""SQLAlchemy Core tables and repositories, the unit of work, replica routing, and shared
state in Redis.

Repositories sit in packages named like the domain's aggregates (``identity/``,
``tunnels/``, ``webhooks/``, ``limits/``, ``events``, ``operations``, ``audit``); the
infrastructure they share stays at the top (``database``, ``tables``, ``base``, ``query``,
``kv``, ``bus``, ``limiter``, ``sealing``, ``migrate``).
"""
