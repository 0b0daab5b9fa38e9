"""Tunnels: the tunnel and its state machine, endpoints and their probes, agents' sessions
and the traffic they report, and sharing (shares, share links, share chains)."""

#: Modules other aggregates may import besides model, ports and rules (see server.domain).
PUBLISHED = ("web_access",)
