"""The link between an agent and a streaming proxy: many exchanges over one WebSocket.

Shared by the agent (which dials) and the proxy (which accepts): :mod:`tplink.mux`.
It imports neither of them.
"""
