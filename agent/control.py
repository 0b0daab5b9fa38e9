"""Applies the control plane's desired state to the relay."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from tunnelplane.v1 import agents_pb2

from agent.counters import Counters
from agent.exchange import ReversePath
from agent.relay import DEFAULT_IDLE_TIMEOUT, Relay, parse_address

log = logging.getLogger("tunnelplane.agent.control")

DesiredState = agents_pb2.DesiredState
#: Builds a relay: ``(listen_host, listen_port, target, counters)``.
RelayFactory = Callable[[str, int, str, Counters], Relay]
#: How long open connections may go on after a stop, when the control plane says nothing.
DEFAULT_STOP_GRACE = 10.0


@dataclass(frozen=True)
class Plan:
    """What a started tunnel should look like on this agent."""

    listen: tuple[str, int]
    target: str
    idle_timeout: float
    max_connections: int


class RelayController:
    """Owns the relay and brings it in line with each desired state.

    States older than the last applied one are ignored. A target change retargets the
    running relay (open connections stay); a listen address change restarts the listener.
    A stop closes the listener at once and drains the open connections in the background
    for the state's grace, so that a start right after it listens again at once. The relay
    is independent of the control-plane stream: it keeps running while the agent
    reconnects.
    """

    def __init__(
        self,
        counters: Counters,
        *,
        default_target: str = "",
        listen_host: str | None = None,
        relay_factory: RelayFactory = Relay,
        reverse: ReversePath | None = None,
    ) -> None:
        self._reverse = reverse
        self._counters = counters
        self._default_target = default_target
        self._listen_host = listen_host
        self._relay_factory = relay_factory
        self._relay: Relay | None = None
        self._draining: dict[asyncio.Task[None], Relay] = {}
        self._version = 0
        self._lock = asyncio.Lock()  # one change at a time, stop() included

    @property
    def relay(self) -> Relay | None:
        """The running relay, if the tunnel is started here."""
        return self._relay

    @property
    def version(self) -> int:
        """Version of the last desired state applied (0: none yet)."""
        return self._version

    async def apply(self, state: DesiredState) -> None:
        """Bring the relay in line with ``state``, unless it is stale."""
        async with self._lock:
            await self._apply(state)

    @property
    def draining(self) -> int:
        """Stopped relays whose open connections are still in their grace."""
        return len(self._draining)

    async def stop(self) -> None:
        """Stop the relay, if any, and close at once what stopped relays still carry."""
        async with self._lock:
            await self._stop()
            if self._reverse is not None:
                await self._reverse.stop()
            draining, self._draining = self._draining, {}
            for task in draining:
                task.cancel()
            await asyncio.gather(*draining, return_exceptions=True)
            await asyncio.gather(*(relay.stop() for relay in draining.values()))

    async def _apply(self, state: DesiredState) -> None:
        if state.version < self._version:
            log.info("stale desired state ignored", extra={"version": state.version})
            return
        if state.run == DesiredState.RUN_STARTED:
            await self._start(state)
        elif state.run == DesiredState.RUN_STOPPED:
            self._drain(_stop_grace(state))
        if self._reverse is not None:
            started = state.run == DesiredState.RUN_STARTED
            target = state.target or self._default_target
            url = state.target_url or (f"http://{target}" if target else "")
            await self._reverse.configure(state.proxy_links if started else (), url)
        # Only now: whoever waits for this version (wait_applied) finds it applied whole,
        # not a relay still being built.
        self._version = state.version

    async def _stop(self) -> None:
        relay, self._relay = self._relay, None
        if relay is not None:
            await relay.stop()

    def _drain(self, grace: float) -> None:
        relay, self._relay = self._relay, None
        if relay is None:
            return
        relay.refuse_new()  # now, not when the task first runs
        task = asyncio.create_task(relay.drain(grace), name="relay-drain")
        self._draining[task] = relay
        task.add_done_callback(lambda done: self._draining.pop(done, None))

    def plan(self, state: DesiredState) -> Plan:
        """The listener, target and limits ``state`` asks for; ValueError if unusable."""
        host, port = parse_address(state.listen_address)
        target = state.target or self._default_target
        if not target:
            raise ValueError("no target: the control plane sent none and --target is unset")
        parse_address(target)
        idle = state.config.idle_timeout.ToTimedelta().total_seconds()
        return Plan(
            listen=(host if self._listen_host is None else self._listen_host, port),
            target=target,
            idle_timeout=idle if idle > 0 else DEFAULT_IDLE_TIMEOUT,
            max_connections=max(state.config.max_connections, 0),
        )

    async def _start(self, state: DesiredState) -> None:
        try:
            plan = self.plan(state)
        except ValueError as exc:
            log.error("cannot start the tunnel", extra={"reason": str(exc)})  # noqa: TRY400
            return
        if self._relay is not None and self._relay.listen_address != plan.listen:
            await self._stop()
        if self._relay is None:
            await self._listen(plan)
        else:
            self._relay.retarget(plan.target)
            self._relay.configure(
                idle_timeout=plan.idle_timeout, max_connections=plan.max_connections
            )

    async def _listen(self, plan: Plan) -> None:
        relay = self._relay_factory(*plan.listen, plan.target, self._counters)
        relay.configure(idle_timeout=plan.idle_timeout, max_connections=plan.max_connections)
        try:
            await relay.start()
        except OSError as exc:
            log.error("cannot listen", extra={"listen": plan.listen, "error": repr(exc)})  # noqa: TRY400
            await relay.stop()
            return
        self._relay = relay


def _stop_grace(state: DesiredState) -> float:
    """The grace a stop gives open connections, in seconds."""
    if not state.HasField("stop_grace"):
        return DEFAULT_STOP_GRACE
    return max(0.0, state.stop_grace.ToTimedelta().total_seconds())
