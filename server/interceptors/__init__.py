"""The stages of the call pipeline, in the order :func:`server.app` chains them:
request context, logging, metrics, tracing, deadline, audit, auth, errors."""
