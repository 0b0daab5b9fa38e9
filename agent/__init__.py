"""Tunnelplane reference agent: relays a tunnel's TCP traffic and reports it to the
control plane over ``AgentService.Connect``.

Run it next to the service a tunnel exposes: ``python -m agent --help``.
"""

__version__ = "0.1.0"
