"""Error tracking: unexpected errors go to Sentry (``TP_SENTRY_DSN``), scrubbed.

Only what nobody expected is an incident: an exception the error stage turns into
``INTERNAL``, and a background loop's failure. A domain error (``NOT_FOUND``, a refused
credential, a rate limit, a dependency reported ``UNAVAILABLE``) is an answer the API
gives on purpose and is never sent.

What an event carries: the exception's type, message and stack (files, functions, lines
and their source, no local variables), the release (``tunnelplane@<version>``), the
environment (``TP_SENTRY_ENVIRONMENT``, else ``TP_MODE``), and the tags ``request_id``,
``trace_id`` (the same ids as the logs and OTLP spans), ``method``, ``transport``,
``principal`` (how the caller signed in: ``session``, ``api_key`` or ``anonymous``, never
who) and, for a loop, ``loop``. Nothing else is collected: the SDK runs without its default
and auto-enabled integrations (no breadcrumbs of log lines or HTTP calls, no request
bodies, headers or users) and collects nothing about people, requests or frame variables.
Because an exception's message can still quote anything, :func:`scrub` runs on every event
before it leaves: values under secret-looking keys are replaced, and in every string
bearer credentials, JWTs, Tunnelplane keys, e-mail addresses and SQL parameters
(:mod:`server.redaction`, which also redacts logged tracebacks).

With ``TP_SENTRY_TRACES_SAMPLE_RATE`` above 0, that share of calls is also sent as a Sentry
transaction named after the method (spans for the trace view go to OTLP, as before).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import re
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import sentry_sdk

from server.redaction import FILTERED, redact

#: Keys whose values are never sent, wherever they appear in an event.
_SECRET_KEY = re.compile(
    r"pass(word|wd)?|secret|token|authorization|cookie|api[-_]?key|dsn|signature|"
    r"credential|session|private|email",
    re.IGNORECASE,
)
_OFF: Any = {"mode": "off"}
#: Parts of an event the SDK may fill that Tunnelplane never sends.
_DROPPED = ("request", "user", "breadcrumbs", "extra")


class ErrorReporter(Protocol):
    """Where unexpected errors go."""

    #: Whether calls are sent as transactions too (only then is :meth:`transaction` used).
    traces: bool

    def capture(self, error: BaseException, tags: Mapping[str, str]) -> None:
        """Report ``error`` with ``tags``."""

    def transaction(self, name: str) -> contextlib.AbstractContextManager[object]:
        """A block timed as a transaction called ``name`` (sampled by the SDK)."""

    def close(self) -> None:
        """Send what is queued (briefly) and stop."""


class NoReporter:
    """No error tracking (``TP_SENTRY_DSN`` unset)."""

    traces = False

    def capture(self, error: BaseException, tags: Mapping[str, str]) -> None:
        """Nothing to do."""

    def transaction(self, name: str) -> contextlib.AbstractContextManager[object]:  # noqa: ARG002
        """No transaction."""
        return contextlib.nullcontext()

    def close(self) -> None:
        """Nothing to close."""


class SentryReporter:
    """Sends unexpected errors to Sentry (:func:`start`)."""

    def __init__(self, traces: bool) -> None:
        self.traces = traces

    def capture(self, error: BaseException, tags: Mapping[str, str]) -> None:
        """One event, with ``tags`` on a scope of its own."""
        with sentry_sdk.new_scope() as scope:
            for key, value in tags.items():
                if value:
                    scope.set_tag(key, value)
            scope.capture_exception(error)

    def transaction(self, name: str) -> contextlib.AbstractContextManager[object]:
        """A Sentry transaction for the call."""
        return _transaction(name)

    def close(self) -> None:
        """Flush for up to two seconds, then stop the SDK."""
        client = sentry_sdk.get_client()
        client.close(timeout=2.0)
        sentry_sdk.get_global_scope().set_client(None)


@contextlib.contextmanager
def _transaction(name: str) -> Iterator[object]:
    with (
        sentry_sdk.isolation_scope(),
        sentry_sdk.start_transaction(op="rpc.server", name=name, source="route") as transaction,
    ):
        yield transaction


def release() -> str:
    """``tunnelplane@<the installed package's version>``."""
    try:
        version = importlib.metadata.version("tunnelplane")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"tunnelplane@{version}"


def start(dsn: str, environment: str, traces_sample_rate: float) -> ErrorReporter:
    """The reporter for ``dsn``: Sentry's SDK started with nothing collected on its own,
    or no reporter at all when ``dsn`` is empty."""
    if not dsn:
        return NoReporter()
    sentry_sdk.init(
        dsn=dsn,
        environment=environment,
        release=release(),
        traces_sample_rate=traces_sample_rate,
        # Nothing about people or requests, no frame variables (send_default_pii's
        # successor); source lines of Tunnelplane's own frames are kept.
        data_collection={
            "user_info": False,
            "cookies": _OFF,
            "http_headers": {"request": _OFF},
            "http_bodies": [],
            "url_query_params": _OFF,
            "database_query_data": False,
            "queues": False,
            "stack_frame_variables": False,
        },
        include_local_variables=False,
        max_breadcrumbs=0,
        default_integrations=False,
        auto_enabling_integrations=False,
        before_send=_before_send,
        before_send_transaction=_before_send,
    )
    return SentryReporter(traces=traces_sample_rate > 0)


def _before_send(event: Any, _hint: Any) -> Any:
    return scrub(event)


def scrub(event: dict[str, Any]) -> dict[str, Any]:
    """``event`` without anything that may be a secret or a person (see the module
    docstring)."""
    for key in _DROPPED:
        event.pop(key, None)
    cleaned: dict[str, Any] = _clean(event)
    return cleaned


def _clean(value: Any, key: str = "") -> Any:
    if key and _SECRET_KEY.search(key):
        return FILTERED
    if isinstance(value, dict):
        return {k: _clean(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(item) for item in value]
    if isinstance(value, str):
        return redact(value)
    return value
