"""The bounded sample behind the p50/p95 of attempt times (sampling.Reservoir)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from batchpool.sampling import BOUNDS, Reservoir


@given(st.lists(st.lists(st.floats(0, 1e6), max_size=600), max_size=40), st.integers(1, 64))
def test_the_sample_is_bounded_and_holds_only_seen_values(batches: list[list[float]], size: int):
    sample = Reservoir(size)
    seen: set[float] = set()
    for batch in batches:
        sample.extend(batch)
        seen.update(batch)
    total = sum(map(len, batches))
    assert sample.seen == total
    assert len(sample.values) == min(size, total)
    assert set(sample.values) <= seen


TIMES = st.floats(0, 1e4) | st.sampled_from(BOUNDS)  # bounds themselves: the edge cases


@given(st.lists(st.lists(TIMES, max_size=50), max_size=20))
def test_the_histogram_counts_every_value_in_its_bucket(batches: list[list[float]]):
    sample = Reservoir(8)
    for batch in batches:
        sample.extend(batch)
    values = [v for batch in batches for v in batch]
    upper = [*BOUNDS, float("inf")]
    expected = [
        sum(1 for v in values if (i == 0 or v > upper[i - 1]) and v <= upper[i])
        for i in range(len(upper))
    ]
    assert sample.buckets == expected
    assert abs(sample.total - sum(values)) <= 1e-9 * max(1.0, sum(values))


def test_quantiles_of_a_long_stream_stay_near_the_truth():
    # 200,000 values 0..199,999 in batches of 512, most of them past a full sample: a sample
    # biased to the first batches (or to the last) would put the median far from 100,000.
    sample = Reservoir(4096)
    values = list(range(200_000))
    for lo in range(0, len(values), 512):
        sample.extend(values[lo : lo + 512])
    assert abs(sample.quantile(0.5) - 100_000) < 6_000
    assert abs(sample.quantile(0.95) - 190_000) < 4_000


def test_an_empty_sample_has_no_quantile():
    assert Reservoir().quantile(0.5) is None
