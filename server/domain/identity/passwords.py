"""Argon2id password hashing, run off the event loop, a bounded number at a time.

Hashing is deliberately expensive, and the calls that hash (sign-in, registration) are
open to anyone: unbounded, a burst of them would take every thread and the memory Argon2
asks for. So at most ``max_concurrent`` hashes run at once, each in a thread of the
hasher's own pool; one more is refused at once with ``RESOURCE_EXHAUSTED`` and a
``RetryInfo`` of about one hash's duration, never queued. A slot is held until the hash
really ends, even when its caller has gone away.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from argon2 import PasswordHasher as _Argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from server.domain.common.errors import ResourceExhausted

T = TypeVar("T")
#: Weight of the latest hash in the running estimate of a hash's duration.
_SMOOTHING = 0.2


class PasswordHasher:
    """Hashes and verifies passwords with Argon2id in a bounded pool of worker threads."""

    def __init__(
        self, time_cost: int, memory_kib: int, parallelism: int, *, max_concurrent: int
    ) -> None:
        self._argon2 = _Argon2(time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism)
        self._limit = max_concurrent
        self._pool = ThreadPoolExecutor(max_concurrent, thread_name_prefix="argon2")
        self._lock = threading.Lock()
        self._running = 0
        started = time.monotonic()
        # Verified when the account does not exist, so that both paths take the same time.
        self._decoy = self._argon2.hash("decoy password that nobody has")
        self._duration = time.monotonic() - started

    async def hash(self, password: str) -> str:
        """An Argon2id hash of ``password``; ``RESOURCE_EXHAUSTED`` when the hasher is full."""
        return await self._run(self._argon2.hash, password)

    async def verify(self, stored_hash: str | None, password: str) -> bool:
        """Whether ``password`` matches; with no hash, spend the same time and say no.
        ``RESOURCE_EXHAUSTED`` when the hasher is full."""
        if stored_hash is None:
            await self._run(self._check, self._decoy, password)
            return False
        return await self._run(self._check, stored_hash, password)

    async def rehash(self, stored_hash: str, password: str) -> str | None:
        """A new hash of a verified ``password`` if ``stored_hash`` was made with other
        parameters; ``None`` when it need not change or the hasher is full (next time)."""
        if not self.needs_rehash(stored_hash):
            return None
        try:
            return await self.hash(password)
        except ResourceExhausted:
            return None

    def needs_rehash(self, stored_hash: str) -> bool:
        """Whether the hash was made with other parameters than the current ones."""
        try:
            return self._argon2.check_needs_rehash(stored_hash)
        except InvalidHashError:
            return True

    def close(self) -> None:
        """Stop the worker threads (hashes running finish in the background)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self, work: Callable[..., T], *args: str) -> T:
        with self._lock:
            if self._running >= self._limit:
                raise ResourceExhausted(
                    "too many passwords are being checked right now; retry shortly",
                    retry_after=max(self._duration, 0.1),
                    reason="PASSWORD_HASHER_BUSY",
                )
            self._running += 1
        try:
            future = self._pool.submit(self._timed, work, *args)
        except BaseException:
            self._release()
            raise
        # Released when the work is over (or was cancelled before it started), not when
        # the caller stops waiting for it.
        future.add_done_callback(self._release)
        return await asyncio.wrap_future(future)

    def _timed(self, work: Callable[..., T], *args: str) -> T:
        started = time.monotonic()
        try:
            return work(*args)
        finally:
            elapsed = time.monotonic() - started
            with self._lock:
                self._duration += _SMOOTHING * (elapsed - self._duration)

    def _release(self, _done: object = None) -> None:
        with self._lock:
            self._running -= 1

    def _check(self, stored_hash: str, password: str) -> bool:
        try:
            return self._argon2.verify(stored_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
