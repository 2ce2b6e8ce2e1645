"""durations.parse_duration: what ``--deadline`` accepts. Pure: properties, no processes."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchpool.durations import UNITS, parse_duration

AMOUNTS = st.decimals(min_value="0.001", max_value="100000", places=3, allow_nan=False)


@given(AMOUNTS, st.sampled_from(sorted(UNITS)), st.sampled_from(["", " "]), st.booleans())
def test_a_number_and_a_unit_are_that_many_seconds(
    amount: object, unit: str, gap: str, upper: bool
) -> None:
    text = f"{amount}{gap}{unit.upper() if upper else unit}"
    assert math.isclose(parse_duration(text), float(str(amount)) * UNITS[unit], rel_tol=1e-12)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("1.5s", 1.5), ("500ms", 0.5), ("30m", 1800), ("2h", 7200), (" 1d ", 86400)],
)
def test_the_documented_forms(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "-5", "0", "0s", "0.0m", "", "5 minutes", "1e3", "nan"])
def test_refused_with_a_one_line_reason(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert "\n" not in str(info.value) and repr(text) in str(info.value)


@given(st.text(max_size=12))
def test_any_text_is_seconds_above_zero_or_a_value_error(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except ValueError:
        return
    assert 0 < seconds < math.inf


def test_too_large_to_hold_is_refused() -> None:
    with pytest.raises(ValueError):
        parse_duration("9" * 400)
