"""Audit: the record of each audited call, and the scope through which a use case adds
what only it knows (whose account, which resource)."""

#: Modules other aggregates may import besides model, ports and rules (see server.domain).
PUBLISHED = ("service",)
