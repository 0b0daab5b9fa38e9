"""The load signal, what it does to each tier, and where a caller's address comes from."""

from __future__ import annotations

import asyncio
import ipaddress
import time

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from server.domain.identity.model import Tier
from server.domain.limits.rules import client_address
from server.load import LoadMonitor
from server.settings import networks
from server.workers.monitors import load_loop
from server.workers.supervisor import Supervisor, WorkerMetrics

TIERS = [Tier.FREE, Tier.PREMIUM, Tier.ENTERPRISE]


def monitor() -> LoadMonitor:
    return LoadMonitor(lag_threshold=0.1, inflight_threshold=100, interval=0.01)


def test_idle_means_full_limits_and_no_shedding() -> None:
    load = monitor()
    load.observe(0.0)
    assert load.factors() == {"free": 1.0, "premium": 1.0, "enterprise": 1.0}
    assert not any(load.sheds(tier, critical=False) for tier in TIERS)


def test_overload_tightens_and_sheds_the_lowest_tier_first_then_relaxes() -> None:
    load = monitor()
    seen: list[tuple[float, dict[str, float], list[bool]]] = []
    for _ in range(40):  # sustained lag at twice the threshold
        load.observe(0.2)
        sheds = [load.sheds(tier, critical=False) for tier in TIERS]
        seen.append((load.level, load.factors(), sheds))
    for level, factors, sheds in seen:
        # Lower tiers are never better off than higher ones.
        assert factors["free"] <= factors["premium"] <= factors["enterprise"]
        assert sheds == sorted(sheds, reverse=True), (level, sheds)
    assert seen[-1][1]["free"] < 0.2
    assert seen[-1][2] == [True, True, True]
    first_free = next(i for i, s in enumerate(seen) if s[2][0])
    first_premium = next(i for i, s in enumerate(seen) if s[2][1])
    assert first_free < first_premium
    assert not load.sheds(Tier.FREE, critical=True), "critical calls are never shed"
    for _ in range(60):
        load.observe(0.0)
    assert load.level == 0.0
    assert load.factors() == {"free": 1.0, "premium": 1.0, "enterprise": 1.0}


def test_calls_in_flight_count_as_load() -> None:
    load = monitor()
    for _ in range(100):
        load.enter()
    for _ in range(30):
        load.observe(0.0)
    assert load.level > 0.95
    for _ in range(100):
        load.leave()
    assert load.in_flight == 0


def test_disabled_reports_no_load() -> None:
    load = LoadMonitor(lag_threshold=0.1, inflight_threshold=1, enabled=False)
    load.enter()
    load.observe(5.0)
    assert load.level == 0.0


async def test_the_run_loop_measures_real_event_loop_lag() -> None:
    load = monitor()
    supervisor = Supervisor(WorkerMetrics(CollectorRegistry()))
    supervisor.start([load_loop(load)])
    try:
        await load.sampled()
        before = load.lag
        asyncio.get_running_loop().call_soon(time.sleep, 0.3)  # a handler hogging the loop
        await load.sampled()
        await load.sampled()
        assert load.lag > before + 0.05
        assert load.level > 0
    finally:
        await supervisor.stop()


TRUSTED = networks("10.0.0.0/8, 127.0.0.1/32")


def test_forwarded_for_is_believed_only_from_a_trusted_proxy() -> None:
    assert client_address("203.0.113.9", "198.51.100.1", TRUSTED) == "203.0.113.9"
    assert client_address("127.0.0.1", "198.51.100.1", TRUSTED) == "198.51.100.1"
    # The right-most untrusted hop: what the client put in front is not believed.
    spoofed = "1.2.3.4, 198.51.100.1, 10.0.0.5"
    assert client_address("127.0.0.1", spoofed, TRUSTED) == "198.51.100.1"
    assert client_address("127.0.0.1", "not-an-ip", TRUSTED) == "127.0.0.1"
    assert client_address("127.0.0.1", "", TRUSTED) == "127.0.0.1"
    assert client_address("127.0.0.1", "198.51.100.1", ()) == "127.0.0.1"


@given(st.lists(st.ip_addresses().map(str), max_size=6), st.ip_addresses().map(str))
def test_an_untrusted_peer_can_never_choose_its_address(hops: list[str], peer: str) -> None:
    address = client_address(peer, ", ".join(hops), TRUSTED)
    if not any(ipaddress.ip_address(peer) in network for network in TRUSTED):
        assert address == peer
    else:
        assert address in {peer, *hops}
