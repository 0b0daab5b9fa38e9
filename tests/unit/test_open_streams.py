"""The per-user stream count: whatever the order of opens and closes, nobody holds more than
the cap, a refused open takes nothing, and a closed stream gives its slot back."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from server.interceptors.streams import OpenStreams

USERS = st.sampled_from(["usr_a", "usr_b"])
LIMITS = st.sampled_from(["max_watch_streams", "max_agent_streams"])
OPS = st.lists(st.tuples(st.booleans(), USERS, LIMITS), max_size=60)


@given(ops=OPS, cap=st.integers(min_value=-1, max_value=4))
def test_counts_follow_a_model_and_never_pass_the_cap(
    ops: list[tuple[bool, str, str]], cap: int
) -> None:
    streams = OpenStreams()
    model: dict[tuple[str, str], int] = {}
    for opening, user, limit in ops:
        key = (user, limit)
        held = model.get(key, 0)
        if opening:
            granted = streams.acquire(user, limit, cap)
            assert granted == (cap < 0 or held < cap)
            if granted:
                model[key] = held + 1
        elif held:
            streams.release(user, limit)
            model[key] = held - 1
        assert streams.held(user, limit) == model.get(key, 0)
        assert cap < 0 or streams.held(user, limit) <= cap
    for limit in ("max_watch_streams", "max_agent_streams"):
        assert streams.total(limit) == sum(n for (_, name), n in model.items() if name == limit)
