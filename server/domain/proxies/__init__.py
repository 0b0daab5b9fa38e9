"""Proxies: what the streaming proxies ask of the control plane — whether a web request
may use a tunnel (its web access), and whether an agent may link to proxies for one."""
