"""The control plane's client of instances' admin sides (``proxy/admin.py``): health with
load, config pushes, traffic and diagnostics, each authenticated with the proxy's admin
token. Wherever a provisioner places instances, they answer here."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from server.domain.proxies.model import Instance, Proxy
from server.domain.proxies.ports import InstanceUnreachableError
from server.resilience.breakers import BreakerOpenError, Breakers


class AdminError(InstanceUnreachableError):
    """An instance's admin side did not answer as it should; the message says how."""


def admin_tokens(key: bytes) -> Callable[[str], str]:
    """Each proxy's admin token, derived from ``key`` (so every replica of the server
    knows it, and a restarted one still does)."""

    def token(proxy_id: str) -> str:
        return hmac.new(key, f"proxy-admin:{proxy_id}".encode(), hashlib.sha256).hexdigest()

    return token


#: The fleet loop's own calls: its health checks are the probe that restarts a dead
#: instance, and its config pushes follow them; neither waits on a breaker.
FLEET_PATHS = frozenset({"/_proxy/health", "/_proxy/config"})
#: Reads for callers (traffic, diagnostics) try twice, 50-500 ms apart (full jitter).
READ_ATTEMPTS = 2


class InstanceAdminClient:
    """Calls instances' admin sides over one pooled HTTP session.

    Callers' reads (a proxy's traffic, diagnostics) go through a circuit breaker per
    instance (``proxy-admin.<instance>``): an instance that stopped answering fails them
    at once instead of costing each its whole timeout. They are idempotent GETs, so a
    failed one is tried once more after an exponential, fully jittered wait (tenacity),
    within the same time limit. The fleet loop's calls (:data:`FLEET_PATHS`) bypass both.
    """

    def __init__(
        self, token: Callable[[str], str], timeout: float = 5.0, breakers: Breakers | None = None
    ) -> None:
        self._breakers = breakers
        self._token = token
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def get(
        self, proxy: Proxy, instance: Instance, path: str, within: float | None = None
    ) -> dict[str, Any]:
        """The JSON an admin path answers; :class:`AdminError` otherwise."""
        if path in FLEET_PATHS or self._breakers is None:
            return await self._call("GET", proxy, instance, path, None, within)
        budget = within or self._timeout
        deadline = time.monotonic() + budget
        try:
            async with self._breakers.guard("proxy-admin", instance.id):
                async for attempt in AsyncRetrying(
                    retry=retry_if_exception_type(AdminError),
                    stop=stop_after_attempt(READ_ATTEMPTS) | stop_after_delay(budget),
                    wait=wait_random_exponential(multiplier=0.05, max=0.5),
                    reraise=True,
                ):
                    with attempt:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise AdminError("the instance did not answer in time")
                        return await self._call("GET", proxy, instance, path, None, left)
        except BreakerOpenError:
            raise AdminError("the instance stopped answering (circuit breaker open)") from None
        raise AdminError("the instance did not answer")  # unreachable: the loop returns or raises

    async def put(
        self,
        proxy: Proxy,
        instance: Instance,
        path: str,
        body: Mapping[str, Any],
        within: float | None = None,
    ) -> dict[str, Any]:
        """PUT ``body`` as JSON to an admin path; its JSON answer."""
        return await self._call("PUT", proxy, instance, path, body, within)

    async def close(self) -> None:
        """Let go of the pool."""
        if self._session is not None:
            await self._session.close()

    async def _call(
        self,
        method: str,
        proxy: Proxy,
        instance: Instance,
        path: str,
        body: Mapping[str, Any] | None,
        within: float | None,
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self._token(proxy.id)}"}
        limit = aiohttp.ClientTimeout(total=within or self._timeout)
        try:
            async with self._http().request(
                method, instance.admin_url + path, json=body, headers=headers, timeout=limit
            ) as response:
                if response.status != 200:
                    raise AdminError(f"the instance answered {response.status}")
                found = await response.json()
        except TimeoutError:
            raise AdminError("the instance did not answer in time") from None
        except (aiohttp.ClientError, ValueError) as exc:
            raise AdminError(f"the instance could not be reached: {type(exc).__name__}") from None
        if not isinstance(found, dict):
            raise AdminError("the instance answered something else than a JSON object")
        return found

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session
