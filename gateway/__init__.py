"""The HTTP/JSON gateway: every ``google.api.http`` rule of a descriptor set, transcoded to
a gRPC call and back (``../shared/TRANSCODING.md``). It knows nothing of the server: it is
driven by descriptors alone, and dispatches either over a grpc.aio channel (standalone,
``python -m gateway``) or into the server's call pipeline in-process (embedded).

- ``bindings`` and ``routes``: the rules, compiled once; the router.
- ``transcode``, ``jsoncheck``, ``jsonenc``: path, query and body to messages; replies to
  proto3 JSON.
- ``headers``, ``preconditions``, ``errors``: metadata, ``If-Match``, statuses and error
  bodies.
- ``streaming``: server streams as NDJSON or Server-Sent Events.
- ``app``, ``asgi``, ``cors``, ``guard``, ``pages``, ``docs``, ``serve``: the ASGI
  application under uvicorn and what surrounds every response.
- ``openapi``: the OpenAPI 3.1 document; ``forward`` and ``telemetry``: the upstream
  channel.
"""
