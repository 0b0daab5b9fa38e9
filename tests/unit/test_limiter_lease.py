"""A replica's slices (``server/storage/limiter_lease.py``), without Redis: when a slice is
renewed, and what a grant carries over."""

from __future__ import annotations

from server.domain.limits.model import Bucket, Check, Decision, Outcome
from server.storage.limiter_lease import Leases

BUCKET = Bucket(60_000, 1000)  # a slice of up to 32 calls with a lease interval of 1 s


def _check() -> Check:
    return Check(
        subject="users/a", ip="10.0.0.1", subject_bucket=BUCKET, ip_bucket=Bucket(60, 1),
        by_address=False,
    )  # fmt: skip


def _granted(leases: Leases, size: int, now: float) -> None:
    """Record a script run that admitted the call and granted ``size - 1`` more."""
    decision = Decision(Outcome.ALLOWED, remaining=500, reset_ms=100)
    leases.granted(_check(), now, size, decision, size - 1, 0)


def test_a_slice_is_renewed_once_less_than_half_of_it_is_left() -> None:
    leases = Leases(1000.0, 32, lambda _key: None)
    assert not leases.running_low(_check(), 0.0), "no slice: nothing to renew ahead"
    _granted(leases, 8, 0.0)  # the call itself and 7 tokens
    low = []
    for _ in range(7):
        low.append(leases.running_low(_check(), 0.0))
        assert leases.spend(_check(), 0.0) is not None
    # 7, 6, 5, 4 tokens left: at least half of 8; 3, 2, 1: less.
    assert low == [False, False, False, False, True, True, True]
    assert not leases.running_low(_check(), 0.0), "spent: the next call must ask anyway"
    assert leases.spend(_check(), 0.0) is None


def test_an_expired_or_foreign_slice_is_not_renewed_ahead() -> None:
    leases = Leases(1000.0, 32, lambda _key: None)
    _granted(leases, 8, 0.0)
    for _ in range(5):
        leases.spend(_check(), 0.0)
    assert leases.running_low(_check(), 999.0)
    assert not leases.running_low(_check(), 1000.0), "expired"
    other = Check(
        subject="users/a", ip="10.0.0.1", subject_bucket=Bucket(6_000, 1000),
        ip_bucket=Bucket(60, 1), by_address=False,
    )  # fmt: skip
    assert not leases.running_low(other, 0.0), "a slice of another bucket (a tier change)"


def test_a_top_up_never_holds_more_than_the_slice() -> None:
    """What is left when the renewal is asked for is counted in: the grant tops it up."""
    leases = Leases(1000.0, 32, lambda _key: None)
    _granted(leases, 8, 0.0)
    for _ in range(5):
        leases.spend(_check(), 0.0)  # 2 left
    size, want, _ = leases.wants(_check(), 100.0)
    assert size == 16, "spent fast: the next slice is twice as big"
    assert want == size - 1 - 2, "the call itself and the 2 tokens still held"
