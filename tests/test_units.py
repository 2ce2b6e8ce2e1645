"""Pure unit tests of the retry policy and the timer heap: no processes, no sleeps, no clock."""

from __future__ import annotations

import math

import pytest

from batchpool.retry import backoff_delay, should_retry
from batchpool.timers import Timers

pytestmark = pytest.mark.timeout(30)


# -- backoff_delay ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n, expected", [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0)])
def test_backoff_doubles_per_retry(n: int, expected: float) -> None:
    assert backoff_delay(n, 0.5, 60.0, 0.25, rand=lambda: 0.0) == pytest.approx(expected)


@pytest.mark.parametrize("jitter", [0.0, 0.25, 0.5, 1.0])
def test_backoff_jitter_bounds(jitter: float) -> None:
    full = backoff_delay(3, 0.5, 60.0, jitter, rand=lambda: 0.0)
    least = backoff_delay(3, 0.5, 60.0, jitter, rand=lambda: 1.0)
    middle = backoff_delay(3, 0.5, 60.0, jitter, rand=lambda: 0.5)
    assert full == pytest.approx(2.0)
    assert least == pytest.approx((1 - jitter) * 2.0)
    assert least <= middle <= full
    assert middle == pytest.approx((1 - jitter / 2) * 2.0)


def test_backoff_capped_at_max_backoff() -> None:
    delays = [backoff_delay(n, 1.0, 5.0, 0.0, rand=lambda: 0.0) for n in range(1, 8)]
    assert delays == pytest.approx([1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0])


def test_backoff_cap_applies_before_jitter() -> None:
    # jitter only shortens: the cap is a hard upper bound.
    assert backoff_delay(10, 1.0, 5.0, 0.2, rand=lambda: 0.0) == pytest.approx(5.0)
    assert backoff_delay(10, 1.0, 5.0, 0.2, rand=lambda: 1.0) == pytest.approx(4.0)


def test_backoff_huge_retry_number_does_not_overflow() -> None:
    delay = backoff_delay(5000, 0.5, 60.0, 0.0, rand=lambda: 0.0)
    assert math.isfinite(delay)
    assert delay == pytest.approx(60.0)


def test_backoff_zero() -> None:
    assert backoff_delay(1, 0.0, 60.0, 0.25, rand=lambda: 0.3) == 0.0
    assert backoff_delay(4, 0.0, 60.0, 0.25, rand=lambda: 0.3) == 0.0


def test_backoff_retry_number_starts_at_one() -> None:
    with pytest.raises(ValueError):
        backoff_delay(0, 0.5, 60.0, 0.25, rand=lambda: 0.0)


def test_backoff_default_rand_within_bounds() -> None:
    for _ in range(200):
        d = backoff_delay(2, 0.5, 60.0, 0.25)
        assert 0.75 <= d <= 1.0


# -- should_retry ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "attempts, retries, retryable, expected",
    [
        (1, 3, True, True),
        (3, 3, True, True),
        (4, 3, True, False),
        (5, 3, True, False),
        (1, 0, True, False),
        (1, 3, False, False),
        (3, 3, False, False),
    ],
)
def test_should_retry(attempts: int, retries: int, retryable: bool, expected: bool) -> None:
    assert should_retry(attempts, retries, retryable) is expected


def test_should_retry_allows_exactly_retries_plus_one_attempts() -> None:
    for retries in range(5):
        attempts = 1
        while should_retry(attempts, retries, True):
            attempts += 1
        assert attempts == retries + 1


# -- Timers ----------------------------------------------------------------------------------------


def test_timers_pop_due_in_time_order() -> None:
    t = Timers()
    t.schedule(3.0, "c", "C")
    t.schedule(1.0, "a", "A")
    t.schedule(2.0, "b", "B")
    assert len(t) == 3
    assert t.next_at() == 1.0
    assert t.pop_due(0.5) == []
    assert t.pop_due(2.0) == [("a", "A"), ("b", "B")]  # due at exactly now is due
    assert len(t) == 1
    assert "a" not in t and "c" in t
    assert t.next_at() == 3.0
    assert t.pop_due(10.0) == [("c", "C")]
    assert t.next_at() is None
    assert len(t) == 0


def test_timers_ties_fire_in_schedule_order() -> None:
    t = Timers()
    for key in ["x", "y", "z"]:
        t.schedule(1.0, key)
    assert [k for k, _ in t.pop_due(1.0)] == ["x", "y", "z"]


def test_timers_cancel() -> None:
    t = Timers()
    t.schedule(1.0, "a")
    t.schedule(2.0, "b")
    t.cancel("a")
    t.cancel("missing")  # harmless
    assert "a" not in t
    assert len(t) == 1
    assert t.next_at() == 2.0  # the stale entry for "a" is skipped
    assert t.pop_due(5.0) == [("b", None)]


def test_timers_reschedule_later_replaces_earlier() -> None:
    t = Timers()
    t.schedule(1.0, "a", "first")
    t.schedule(5.0, "a", "second")
    assert len(t) == 1
    assert t.next_at() == 5.0
    assert t.pop_due(2.0) == []
    assert t.pop_due(5.0) == [("a", "second")]
    assert t.pop_due(100.0) == []


def test_timers_reschedule_earlier_replaces_later() -> None:
    t = Timers()
    t.schedule(5.0, "a", "first")
    t.schedule(1.0, "a", "second")
    assert t.next_at() == 1.0
    assert t.pop_due(1.0) == [("a", "second")]
    assert t.next_at() is None  # the stale 5.0 entry is not live
    assert t.pop_due(10.0) == []


def test_timers_next_at_skips_many_stale_entries() -> None:
    t = Timers()
    for i in range(100):
        t.schedule(float(i), ("k", i))
    for i in range(99):
        t.cancel(("k", i))
    assert t.next_at() == 99.0
    assert t.pop_due(1000.0) == [(("k", 99), None)]


def test_timers_cancel_then_schedule_again() -> None:
    t = Timers()
    t.schedule(1.0, "a", 1)
    t.cancel("a")
    t.schedule(3.0, "a", 2)
    assert t.pop_due(2.0) == []
    assert t.next_at() == 3.0
    assert t.pop_due(3.0) == [("a", 2)]


def test_timers_empty() -> None:
    t = Timers()
    assert t.next_at() is None
    assert t.pop_due(1e9) == []
    assert len(t) == 0
