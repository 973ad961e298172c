"""The reuse model on replayed create/release histories (pure: no I/O, times given)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidal.instance.reuse import HALF_LIFE_S, WINDOW_S, ModelParams, ReuseModel

REFILL_S = 0.5


def replay(model: ReuseModel, shape: str, times: list[float]) -> None:
    for t in times:
        model.record_create(shape, t, REFILL_S)


def test_a_bursty_shape_grows_and_an_idle_one_shrinks_to_pool_min() -> None:
    m = ReuseModel()
    replay(m, "bursty", [100.0 + i * 0.01 for i in range(12)])  # 12 creates within 0.12 s
    replay(m, "calm", [100.0, 130.0, 160.0])  # one create at a time
    assert m.target("bursty", 100.2, pool_min=0, pool_max=50) == 12
    assert m.target("calm", 160.1, pool_min=0, pool_max=50) == 1
    # the burst fades: after one half-life it counts half, after the window nothing
    assert m.target("bursty", 100.12 + HALF_LIFE_S, pool_min=0, pool_max=50) == 6
    assert m.target("bursty", 100.2 + WINDOW_S, pool_min=0, pool_max=50) == 0
    assert m.target("bursty", 100.2 + WINDOW_S, pool_min=2, pool_max=50) == 2
    assert m.target("never-seen", 0.0, pool_min=1, pool_max=5) == 1


def test_the_cap_holds_and_zero_disables() -> None:
    m = ReuseModel()
    replay(m, "s", [10.0 + i * 0.001 for i in range(200)])
    assert m.target("s", 10.3, pool_min=0, pool_max=8) == 8
    assert m.target("s", 10.3, pool_min=3, pool_max=0) == 0


def test_creates_further_apart_than_the_refill_time_are_separate_bursts() -> None:
    m = ReuseModel()
    bursts = [m.record_create("s", t, REFILL_S) for t in (0.0, 0.4, 0.8, 5.0, 5.1)]
    assert bursts == [1, 2, 2, 1, 2]


def test_releases_are_counted_but_do_not_raise_the_target() -> None:
    m = ReuseModel()
    for i in range(30):
        m.record_create("cycle", i * 10.0, REFILL_S)
        m.record_release("cycle", i * 10.0 + 5.0)
    assert m.releases_in("cycle", 300.0) == 30
    assert m.target("cycle", 300.0, pool_min=0, pool_max=10) == 1


def test_parameters_are_checked() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        ModelParams(window_s=0)


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.floats(min_value=0.0, max_value=30.0), min_size=1, max_size=60),
    pool_min=st.integers(0, 5),
    pool_max=st.integers(0, 20),
    later=st.floats(min_value=0.0, max_value=2 * WINDOW_S),
)
def test_target_stays_within_bounds_and_never_grows_while_idle(
    gaps: list[float], pool_min: int, pool_max: int, later: float
) -> None:
    m = ReuseModel()
    t = 0.0
    times = []
    for g in gaps:
        t += g
        times.append(t)
    replay(m, "s", times)
    now = times[-1]
    first = m.target("s", now, pool_min=pool_min, pool_max=pool_max)
    idle = m.target("s", now + later, pool_min=pool_min, pool_max=pool_max)
    assert min(pool_max, pool_min) <= first <= pool_max
    assert idle <= first  # no create meanwhile: the target can only fall
    # the learned size is at least the last create's own burst (faded by nothing)
    last_burst = sum(1 for x in times if x > now - REFILL_S)
    assert m.learned("s", now) >= last_burst
    if later > WINDOW_S:
        assert idle == min(pool_max, pool_min)
