"""Provisioners: what runs proxies' instances, behind the proxies' ``Provisioner`` port
(:mod:`server.domain.proxies.ports`). ``kubernetes`` places a Deployment per proxy pool
in a cluster; each module here imports the domain, and the domain none of them."""
