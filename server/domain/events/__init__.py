"""Events: the event log, written with the change it describes, and the bus that fans
committed events out to watchers on every replica."""

#: Modules other aggregates may import besides model, ports and rules (see server.domain).
PUBLISHED = ("service",)
