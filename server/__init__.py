"""The Tunnelplane control plane: a gRPC server with its HTTP/JSON gateway embedded.

- ``app`` (the composition root) and ``compose/`` (one builder per area); ``__main__``
  (``serve``, ``migrate``, ``create-admin``) and ``process_group`` (``--workers N``).
- ``pipeline`` and ``interceptors/``: the chain of stages every call runs through;
  ``grpc_server`` and ``http`` adapt the two transports to it; ``policy`` reads each
  method's declared policy from the descriptors.
- ``api/``: one servicer per proto service; ``domain/``: one package per aggregate;
  ``storage/``: repositories and shared state; ``workers/``: background loops.
- ``settings`` (with ``settings_env`` and ``settings_checks``), ``keys``, ``logs``,
  ``health``, ``load``, ``status``, ``runtime``, ``cookies``: the process around them.
"""
