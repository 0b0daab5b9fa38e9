"""The notifier's rules: every channel gets each notice within its own hourly limit; one
channel's failure spares the rest; conditions are told once raised and once cleared."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from server.domain.notifications.model import Notice, Severity
from server.domain.notifications.rules import HOUR, Conditions, HourlyLimit
from server.domain.notifications.service import Notifier

NOW = datetime(2026, 12, 5, tzinfo=UTC)


class Recorded:
    """A channel that keeps what it is sent (or fails)."""

    def __init__(self, name: str, *, fails: bool = False) -> None:
        self.kind, self.name, self.fails = "webhook", name, fails
        self.sent: list[Notice] = []

    async def send(self, notice: Notice) -> None:
        if self.fails:
            raise ConnectionError("down")
        self.sent.append(notice)


def notice(key: str = "k") -> Notice:
    return Notice(key, Severity.CRITICAL, "s", NOW)


async def test_each_channel_within_its_own_limit_and_failures_are_isolated() -> None:
    clock = [0.0]
    counts: list[tuple[str, str]] = []
    broken, good = Recorded("broken", fails=True), Recorded("good")
    notifier = Notifier([broken, good], None, 2, lambda *c: counts.append(c), lambda: clock[0])
    for key in "abc":
        await notifier.notify(notice(key))
    assert [n.key for n in good.sent] == ["a", "b"]
    assert counts.count(("webhook", "failed")) == 2
    assert counts.count(("webhook", "rate_limited")) == 2  # the third, on each channel
    clock[0] = HOUR + 1  # an hour on: room again
    await notifier.notify(notice("d"))
    assert [n.key for n in good.sent] == ["a", "b", "d"]


@given(st.lists(st.floats(0, 10 * HOUR), max_size=200), st.integers(1, 20))
def test_never_more_than_the_limit_in_any_hour(times: list[float], per_hour: int) -> None:
    limit = HourlyLimit(per_hour)
    taken = [t for t in sorted(times) if limit.take(t)]
    for start in taken:
        assert len([t for t in taken if start <= t < start + HOUR]) <= per_hour


@given(st.lists(st.tuples(st.sampled_from("xyz"), st.booleans()), max_size=100))
def test_a_condition_is_news_only_when_it_changes(seen: list[tuple[str, bool]]) -> None:
    conditions, state = Conditions(), dict.fromkeys("xyz", False)
    for key, up in seen:
        news = conditions.raised(key) if up else conditions.cleared(key)
        assert news == (up != state[key])
        state[key] = up
    assert conditions.active == {k for k, v in state.items() if v}
