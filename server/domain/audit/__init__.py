"""Audit: the record of each audited call, written by the use case that serves it in the
transaction of its change, with the call's context passed in explicitly."""

#: Modules other aggregates may import besides model, ports and rules (see server.domain).
PUBLISHED = ("service",)
