"""Provisioners: what runs proxies' instances, behind the proxies' ``Provisioner`` port
(:mod:`server.domain.proxies.ports`): ``local`` as child processes of this server (the
embedded default), ``kubernetes`` as a Deployment per proxy pool in a cluster; ``admin``
is the control plane's client of the instances' admin sides. Each module here imports the
domain, and the domain none of them."""
