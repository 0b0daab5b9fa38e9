"""The streaming proxy: the cloud side of a tunnel.

Web clients' HTTP requests come in (:mod:`proxy.web`), are routed to a tunnel by host or
path prefix (:mod:`proxy.routing`), allowed or refused by the control plane's decision
(:mod:`proxy.control`), and carried over an exchange that the tunnel's agent opened
outbound (:mod:`proxy.links`) to the local service, streaming both ways.
:mod:`proxy.app` puts the parts together; ``python -m proxy`` runs them.
"""
