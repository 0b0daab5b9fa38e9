"""Whose reads these are, for read-your-writes on a read replica.

The authentication stage sets :data:`reader_var` to the caller's user id once it knows the
caller; the storage's replica routing (``server.storage.replica``) reads it, in the same
task, to send the reads of a caller who has just written to the primary."""

from __future__ import annotations

import contextvars

#: The user id of the call being served ("" for an anonymous call or background work).
reader_var: contextvars.ContextVar[str] = contextvars.ContextVar("reader", default="")
