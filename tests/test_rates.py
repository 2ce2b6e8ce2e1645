"""Rate limits (batchpool.rates): what a setting means, and the admission's bound -- in any
window of T seconds at most rate * T + 1 admissions -- over random sequences of ``now``, with
the admissions as frequent as the rate lets them be. Pure logic: no processes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchpool.rates import Admission, parse_rate

EPS = 1e-9


@pytest.mark.parametrize(
    ("text", "per_second"),
    [
        ("100/s", 100.0),
        ("30/m", 0.5),
        ("1000/h", 1000 / 3600),
        ("2.5/s", 2.5),
        (" 12 / m ", 0.2),
        ("7", 7.0),
        (0.25, 0.25),
        (3, 3.0),
        (None, None),
    ],
)
def test_rates_parse_to_attempts_per_second(text: object, per_second: float | None) -> None:
    assert parse_rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize(
    "bad",
    ["fast", "-1/s", "10/x", "0", "0/s", "", "/s", "1e3/s", 0, -5, 0.0, float("inf"), True, [1]],
)
def test_bad_rates_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="rate_limit"):
        parse_rate(bad)


@given(st.floats(0.001, 1e6), st.sampled_from([("s", 1), ("m", 60), ("h", 3600)]))
def test_a_unit_divides_by_its_seconds(n: float, unit: tuple[str, int]) -> None:
    assert parse_rate(f"{n!r}/{unit[0]}") == pytest.approx(n / unit[1])


@settings(max_examples=300, deadline=None)
@given(
    st.floats(0.1, 5000),
    st.lists(st.floats(0, 0.02), min_size=1, max_size=200),
)
def test_admissions_never_exceed_rate_times_window_plus_one(
    rate: float, steps: list[float]
) -> None:
    """Callers ask at random times (never going back) and take every admission offered."""
    gate = Admission(rate)
    now = 0.0
    admitted: list[float] = []
    for step in steps:
        now += step
        if gate.ready(now):
            gate.admit(now)
            admitted.append(now)
    for i in range(len(admitted)):
        for j in range(i + 1, len(admitted)):
            window = admitted[j] - admitted[i]
            assert j - i + 1 <= rate * window + 1 + EPS


@settings(max_examples=200, deadline=None)
@given(st.floats(0.1, 1000), st.floats(0, 100))
def test_the_first_goes_at_once_and_the_next_one_interval_later(rate: float, t: float) -> None:
    gate = Admission(rate)
    assert gate.ready(t)
    gate.admit(t)
    assert not gate.ready(t + 0.999 / rate)
    assert gate.ready(t + 1 / rate)
