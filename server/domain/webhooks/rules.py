"""Webhook rules: secrets, Standard Webhooks signing, payloads, filters, transforms, retries.

Pure functions only; the outbox, the dispatcher and the HTTP client live elsewhere. Errors:

* :class:`PayloadTooLarge` (a :class:`~server.domain.common.errors.FailedPrecondition`): an
  event body over :data:`MAX_PAYLOAD` bytes; it is never sent.
* :class:`TransformFailed` (a :class:`~server.domain.common.errors.FailedPrecondition`): an
  endpoint's JMESPath transformation failed on one event at delivery time; the dispatcher
  records it.
* :class:`SignatureInvalid` (an :class:`~server.domain.common.errors.Unauthenticated`):
  raised by :func:`verify`, the receiver's side, used by our tests and example receivers.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import json
import random
import re
import secrets as secrets_module
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import jmespath
from jmespath import exceptions as jmespath_errors
from jmespath.functions import Functions
from jmespath.parser import ParsedResult
from jmespath.visitor import TreeInterpreter

from server.domain.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    Unauthenticated,
    Violations,
)

SECRET_PREFIX = "whsec_"  # noqa: S105 - the public marker of the format, not a secret
SECRET_BYTES = 32
MIN_SECRET_BYTES = 24
MAX_SECRET_BYTES = 64
SIGNATURE_VERSION = "v1"
MAX_PAYLOAD = 20 * 1024
MAX_FILTERS = 50
MAX_TRANSFORM_LENGTH = 2000
#: Work units (result nodes plus string characters) one transformation may produce in all.
TRANSFORM_BUDGET = 1_000_000
MAX_URL_LENGTH = 2048
RETRY_SCHEDULE: tuple[timedelta, ...] = (
    timedelta(seconds=5),
    timedelta(minutes=5),
    timedelta(minutes=30),
    timedelta(hours=2),
    timedelta(hours=5),
    timedelta(hours=10),
    timedelta(hours=10),
)
JITTER = 0.2
MAX_RETRY_AFTER = timedelta(hours=24)
DISABLE_AFTER = timedelta(days=5)
#: Statuses whose ``Retry-After`` header the dispatcher honours.
RETRY_AFTER_STATUSES = frozenset({429, 503})

_TYPE = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)*")
_WILDCARD = re.compile(r"(?:[a-z][a-z0-9_]*\.)+\*")


class PayloadTooLarge(FailedPrecondition):
    """An event body is larger than :data:`MAX_PAYLOAD`; ``size`` says by how much."""

    default_reason = "WEBHOOK_PAYLOAD_TOO_LARGE"

    def __init__(self, size: int) -> None:
        self.size = size
        super().__init__(f"webhook payload is {size} bytes; the limit is {MAX_PAYLOAD}")


class TransformFailed(FailedPrecondition):
    """An endpoint's transformation failed on one event (a type error, a runaway result)."""

    default_reason = "WEBHOOK_TRANSFORM_FAILED"


class SignatureInvalid(Unauthenticated):
    """A received webhook is unsigned, signed with another key, or outside the tolerance."""

    default_reason = "WEBHOOK_SIGNATURE_INVALID"


# --- secrets and signatures -------------------------------------------------------------


def new_secret() -> str:
    """A fresh endpoint secret: ``whsec_`` + standard base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets_module.token_bytes(SECRET_BYTES)).decode()


def parse_secret(secret: str) -> bytes:
    """The key bytes of a ``whsec_`` secret; ``ValueError`` if it is malformed."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"a webhook secret starts with {SECRET_PREFIX!r}")
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error as exc:
        raise ValueError("a webhook secret is base64 after its prefix") from exc
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise ValueError(f"a webhook secret has {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes")
    return key


def _digest(key: bytes, msg_id: str, timestamp: int, body: bytes) -> bytes:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return hmac.new(key, signed, hashlib.sha256).digest()


def sign(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: one ``v1,<base64>`` per secret, space-separated.

    During a rotation pass the new and the old secret; a receiver that knows either accepts.
    """
    if not secrets:
        raise ValueError("at least one secret signs a webhook")
    digests = (_digest(parse_secret(s), msg_id, timestamp, body) for s in secrets)
    return " ".join(f"{SIGNATURE_VERSION},{base64.b64encode(d).decode()}" for d in digests)


def headers(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers of one delivery attempt."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secrets, msg_id, timestamp, body),
    }


def verify(
    secret: str, headers: Mapping[str, str], body: bytes, now: datetime, tolerance: float = 300
) -> None:
    """Check a received webhook as a receiver would; :class:`SignatureInvalid` if it fails.

    Header names are case-insensitive; the timestamp must be within ``tolerance`` seconds
    of ``now`` either way; signatures are compared in constant time.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    msg_id = lowered.get("webhook-id", "")
    stamp = lowered.get("webhook-timestamp", "")
    if not (msg_id and stamp.isascii() and stamp.isdigit()):
        raise SignatureInvalid("missing or malformed webhook-id or webhook-timestamp")
    timestamp = int(stamp)
    if abs(now.timestamp() - timestamp) > tolerance:
        raise SignatureInvalid("webhook timestamp outside the tolerance")
    expected = _digest(parse_secret(secret), msg_id, timestamp, body)
    if not any(hmac.compare_digest(expected, s) for s in _signatures(lowered)):
        raise SignatureInvalid("no matching webhook signature")


def _signatures(lowered: Mapping[str, str]) -> list[bytes]:
    found = []
    for entry in lowered.get("webhook-signature", "").split():
        version, _, encoded = entry.partition(",")
        if version != SIGNATURE_VERSION:
            continue
        try:
            found.append(base64.b64decode(encoded, validate=True))
        except binascii.Error:
            continue
    return found


# --- payloads ---------------------------------------------------------------------------


def rfc3339(moment: datetime) -> str:
    """``moment`` (timezone-aware) in UTC as RFC 3339 with a ``Z``."""
    if moment.tzinfo is None:
        raise ValueError("a webhook timestamp is timezone-aware")
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def json_name(field: str) -> str:
    """The proto3 JSON name of a field name (``display_name`` -> ``displayName``): every
    underscore dropped, the letter after it in upper case."""
    head, *rest = field.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def json_names(value: Any) -> Any:
    """``value`` with the keys of every object in it renamed by :func:`json_name`: an
    event's payload as the JSON API names things (payloads hold no user-keyed maps)."""
    if isinstance(value, Mapping):
        return {json_name(str(k)): json_names(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_names(v) for v in value]
    return value


def payload(event_type: str, timestamp: datetime, data: Mapping[str, object]) -> bytes:
    """The compact JSON body ``{"type", "timestamp", "data"}``; :class:`PayloadTooLarge`."""
    document = {"type": event_type, "timestamp": rfc3339(timestamp), "data": data}
    body = json.dumps(document, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    if len(body) > MAX_PAYLOAD:
        raise PayloadTooLarge(len(body))
    return body


# --- event-type filters -----------------------------------------------------------------


def validate_filters(
    filters: Sequence[str], known_types: frozenset[str], field: str = "webhook.event_types"
) -> tuple[str, ...]:
    """Checked filters, duplicates removed in order; ``()`` means every event.

    An entry is a known type (``tunnel.created``), a prefix wildcard over at least one
    known type (``tunnel.*``), or ``*``. Each bad entry is named as ``field[i]``.
    """
    if len(filters) > MAX_FILTERS:
        raise InvalidArgument.single(field, f"at most {MAX_FILTERS} event types")
    violations = Violations()
    for index, entry in enumerate(filters):
        problem = _filter_problem(entry, known_types)
        if problem:
            violations.add(f"{field}[{index}]", problem)
    violations.raise_if_any()
    return tuple(dict.fromkeys(filters))


def _filter_problem(entry: str, known_types: frozenset[str]) -> str:
    if entry == "*":
        return ""
    if _WILDCARD.fullmatch(entry):
        prefix = entry[:-1]
        if any(t.startswith(prefix) for t in known_types):
            return ""
        return f"no event type matches {entry!r}"
    if not _TYPE.fullmatch(entry):
        return "an event type like 'tunnel.created', a prefix like 'tunnel.*', or '*'"
    return "" if entry in known_types else f"unknown event type {entry!r}"


def matches(filters: Sequence[str], event_type: str) -> bool:
    """Whether an endpoint with these (validated) filters receives ``event_type``."""
    if not filters:
        return True
    return any(
        f in ("*", event_type) or (f.endswith(".*") and event_type.startswith(f[:-1]))
        for f in filters
    )


# --- transformations --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Transform:
    """A checked JMESPath transformation; build it with :func:`compile_transform`."""

    expression: str
    parsed: ParsedResult


def compile_transform(expression: str, field: str = "webhook.transform") -> Transform:
    """Check a transformation when it is written; :class:`InvalidArgument` naming ``field``.

    Refuses syntax errors, unknown functions and wrong argument counts, and expressions
    longer than :data:`MAX_TRANSFORM_LENGTH` or nested too deeply to parse.
    """
    if not expression.strip():
        raise InvalidArgument.single(field, "a JMESPath expression is required")
    if len(expression) > MAX_TRANSFORM_LENGTH:
        raise InvalidArgument.single(field, f"at most {MAX_TRANSFORM_LENGTH} characters")
    try:
        parsed = jmespath.compile(expression)
    except jmespath_errors.JMESPathError as exc:
        raise InvalidArgument.single(field, _syntax_message(exc)) from None
    except RecursionError:
        raise InvalidArgument.single(field, "the expression is nested too deeply") from None
    problem = _function_problem(parsed.parsed)
    if problem:
        raise InvalidArgument.single(field, problem)
    return Transform(expression, parsed)


def _syntax_message(exc: jmespath_errors.JMESPathError) -> str:
    if isinstance(exc, jmespath_errors.LexerError):
        return f"invalid JMESPath at position {exc.lexer_position}: {exc.message}"
    if isinstance(exc, jmespath_errors.IncompleteExpressionError):
        return "invalid JMESPath: the expression is incomplete"
    if isinstance(exc, jmespath_errors.ParseError):
        return f"invalid JMESPath at position {exc.lex_position}: {exc.msg}"
    return "invalid JMESPath expression"


def _function_problem(root: Any) -> str:
    """The first unknown function or wrong argument count in a parsed tree, or ``""``."""
    table: dict[str, Any] = Functions.FUNCTION_TABLE
    stack = [root]
    while stack:
        node = stack.pop()
        stack.extend(node.get("children", ()))
        if node["type"] != "function_expression":
            continue
        name, given = node["value"], len(node["children"])
        if name not in table:
            return f"unknown JMESPath function {name}()"
        signature = table[name]["signature"]
        variadic = bool(signature) and signature[-1].get("variadic", False)
        if given < len(signature) or (given > len(signature) and not variadic):
            least = "at least " if variadic else ""
            return f"{name}() takes {least}{len(signature)} argument(s), not {given}"
    return ""


def apply_transform(compiled: Transform, payload: Mapping[str, object]) -> dict[str, object]:
    """The transformed ``data``: the expression's result over the whole payload document.

    A result that is not a JSON object is wrapped as ``{"value": result}``. Type errors and
    results that grow past :data:`TRANSFORM_BUDGET` raise :class:`TransformFailed`.
    """
    try:
        result = _BoundedInterpreter(TRANSFORM_BUDGET).visit(compiled.parsed.parsed, payload)
    except jmespath_errors.JMESPathError as exc:
        raise TransformFailed(f"webhook transformation failed: {exc}") from None
    if isinstance(result, dict):
        return result
    return {"value": result}


class _BoundedInterpreter(TreeInterpreter):
    """Charges every intermediate result by its size, so ``[@,@][] | [@,@][] | ...``
    (each stage doubling) stops at the budget instead of exhausting memory."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self._left = budget

    def visit(self, node: Any, *args: Any, **kwargs: Any) -> Any:
        result = super().visit(node, *args, **kwargs)
        self._left -= _weight(result, self._left + 1)
        if self._left < 0:
            raise TransformFailed("webhook transformation result too large")
        return result


def _weight(value: object, limit: int) -> int:
    """Nodes plus string characters in ``value``, counting no further than ``limit``."""
    total, stack = 0, [value]
    while stack and total < limit:
        item = stack.pop()
        total += 1 + (len(item) if isinstance(item, str) else 0)
        if isinstance(item, dict):
            stack.extend(item.values())
            total += sum(len(k) for k in item if isinstance(k, str))
        elif isinstance(item, list):
            stack.extend(item)
    return total


# --- retries and outcomes ---------------------------------------------------------------


class Outcome(enum.StrEnum):
    """What one delivery attempt means for the message and the endpoint."""

    SUCCESS = "success"
    RETRY = "retry"
    #: 410 Gone: disable the endpoint at once.
    GONE = "gone"


def classify(status: int | None, error: str | None) -> Outcome:
    """The outcome of an attempt: 2xx succeeds, 410 is gone, anything else (3xx, 4xx, 5xx,
    a timeout or connection error with no status) is retried."""
    if error is not None or status is None:
        return Outcome.RETRY
    if 200 <= status < 300:
        return Outcome.SUCCESS
    return Outcome.GONE if status == 410 else Outcome.RETRY


def retry_after_seconds(header_value: str | None, now: datetime) -> float | None:
    """Seconds a ``Retry-After`` value asks to wait (delta-seconds or HTTP-date), or None."""
    value = (header_value or "").strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - now).total_seconds(), 0.0)


def next_attempt(
    attempt: int,
    now: datetime,
    *,
    rng: random.Random,
    retry_after: float | None = None,
    schedule: Sequence[timedelta] = RETRY_SCHEDULE,
) -> datetime | None:
    """When retry number ``attempt`` (1 = the first retry) is due, or None when exhausted.

    The scheduled delay gets ±20 % jitter; ``retry_after`` seconds (capped at 24 h) is a
    lower bound on the delay.
    """
    if attempt < 1:
        raise ValueError("retries are numbered from 1")
    if attempt > len(schedule):
        return None
    delay = schedule[attempt - 1] * rng.uniform(1 - JITTER, 1 + JITTER)
    if retry_after is not None:
        delay = max(delay, min(timedelta(seconds=max(retry_after, 0.0)), MAX_RETRY_AFTER))
    return now + max(delay, timedelta(0))


def should_disable(
    first_failure_at: datetime, now: datetime, disable_after: timedelta = DISABLE_AFTER
) -> bool:
    """Whether an endpoint failing without a success since ``first_failure_at`` is disabled."""
    return now - first_failure_at >= disable_after


# --- URL policy -------------------------------------------------------------------------


def check_url(url: str, *, require_https: bool, field: str = "webhook.url") -> str:
    """``url`` if it is an acceptable endpoint URL; :class:`InvalidArgument` naming ``field``.

    Resolved addresses are checked with :func:`server.domain.common.addresses.public_only`.
    """
    problem = _url_problem(url, require_https=require_https)
    if problem:
        raise InvalidArgument.single(field, problem)
    return url


def _url_problem(url: str, *, require_https: bool) -> str:
    if len(url) > MAX_URL_LENGTH:
        return f"at most {MAX_URL_LENGTH} characters"
    if not url.isprintable() or any(c.isspace() for c in url):
        return "no spaces or control characters"
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError:
        return "not a valid URL"
    scheme = parts.scheme.lower()
    checks = (
        (scheme not in ("http", "https"), "an http or https URL"),
        (require_https and scheme != "https", "must use https"),
        (not parts.hostname, "a host is required"),
        (parts.username is not None or parts.password is not None, "no credentials in the URL"),
        ("#" in url, "no fragment"),
    )
    return next((message for failed, message in checks if failed), "")
