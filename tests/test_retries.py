"""Retries: counts, backoff delays, permanent failures, retry_on, remote exceptions."""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import faults
import pytest
from faults import (
    CustomRetryable,
    FailTimes,
    Mixed,
    Raise,
    RaiseUnpicklable,
    attempts_of,
)
from helpers import check_invariants, run_jobs, run_one

from batchpool import Pool

pytestmark = pytest.mark.timeout(90)


def test_retries_until_success(tmp_path: Path) -> None:
    with Pool(FailTimes(2, tmp_path, retries=3), procs=2) as pool:
        results = pool.map(["a", "b", "c"])
        metrics = pool.metrics()
    for r in results:
        assert r.ok, r
        assert r.value == r.payload
        assert r.attempts == 3
        assert len(attempts_of(tmp_path, r.payload)) == 3
    check_invariants(metrics)
    assert metrics.retried == 6
    assert metrics.started == 9


def test_retries_exhausted(tmp_path: Path) -> None:
    with Pool(FailTimes(10, tmp_path, retries=2), procs=2) as pool:
        r = pool.map(["a"])[0]
    assert not r.ok
    assert r.attempts == 3
    assert len(attempts_of(tmp_path, "a")) == 3  # no attempt beyond retries + 1
    assert r.error.kind == "error"
    assert r.error.type == "ValueError"
    assert r.error.message == "attempt 3 of 'a' fails"
    assert r.error.exitcode is None
    # The worker-side traceback ends in the task's own run() frame, at the raise, with the
    # exception that the last attempt raised.
    lines = r.error.traceback.rstrip("\n").splitlines()
    assert lines[0] == "Traceback (most recent call last):", r.error.traceback
    assert lines[-1] == "ValueError: attempt 3 of 'a' fails", r.error.traceback
    frames = [line for line in lines if line.startswith("  File ")]
    assert frames[-1] == f'  File "{faults.__file__}", line {_line_of_raise(FailTimes)}, in run'


def _line_of_raise(task: type) -> int:
    """The line of faults.py where ``task.run`` raises."""
    source, first = inspect.getsourcelines(task.run)
    [offset] = [i for i, line in enumerate(source) if line.strip().startswith("raise ")]
    return first + offset


def test_zero_retries_means_one_attempt(tmp_path: Path) -> None:
    with Pool(FailTimes(1, tmp_path, retries=0), procs=1) as pool:
        r = pool.map(["a"])[0]
    assert not r.ok and r.attempts == 1


def test_pool_retries_override_task(tmp_path: Path) -> None:
    with Pool(FailTimes(3, tmp_path, retries=0), procs=1, retries=3) as pool:
        r = pool.map(["a"])[0]
    assert r.ok and r.attempts == 4


def test_backoff_delays_observed(tmp_path: Path) -> None:
    # Deterministic lower bounds: jitter 0, delays 0.2, 0.4, 0.8 s.
    task = FailTimes(3, tmp_path, retries=3, backoff=0.2, jitter=0.0, max_backoff=60.0)
    with Pool(task, procs=2) as pool:
        r = run_one(pool, "a")
    assert r.ok and r.attempts == 4
    times = [at for at, _ in attempts_of(tmp_path, "a")]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    for n, gap in enumerate(gaps, start=1):
        minimum = 0.2 * 2 ** (n - 1)
        assert gap >= minimum, (n, gaps)
        assert gap < minimum + 3.0, (n, gaps)


def test_backoff_with_jitter_stays_within_bounds(tmp_path: Path) -> None:
    task = FailTimes(2, tmp_path, retries=2, backoff=0.4, jitter=0.5)
    with Pool(task, procs=1) as pool:
        r = run_one(pool, "a")
    assert r.ok and r.attempts == 3
    times = [at for at, _ in attempts_of(tmp_path, "a")]
    assert times[1] - times[0] >= 0.4 * 0.5
    assert times[2] - times[1] >= 0.8 * 0.5
    assert times[2] - times[1] < 0.8 + 3.0


def test_backoff_override_and_cap(tmp_path: Path) -> None:
    # Uncapped the delays would be 0.5 + 1 + 2 = 3.5 s; capped at 0.1 s each they are 0.3 s.
    task = FailTimes(3, tmp_path, retries=3, backoff=0.5, max_backoff=0.1, jitter=0.0)
    with Pool(task, procs=1) as pool:
        r = run_one(pool, "a")
    assert r.ok and r.attempts == 4
    times = [at for at, _ in attempts_of(tmp_path, "a")]
    assert all(b - a >= 0.1 for a, b in zip(times, times[1:], strict=False)), times
    assert times[-1] - times[0] < 2.5, times
    # Pool(backoff=...) overrides the task's backoff.
    other = tmp_path / "override"
    other.mkdir()
    task = FailTimes(1, other, retries=1, backoff=30.0, jitter=0.0)
    with Pool(task, procs=1, backoff=0.0) as pool:
        r = run_one(pool, "b", timeout=20)
    assert r.ok and r.attempts == 2


def test_permanent_error_fails_at_once() -> None:
    with Pool(Raise("PermanentError", retries=5), procs=1) as pool:
        r = run_one(pool, "x")
        metrics = pool.metrics()
    assert not r.ok
    assert r.attempts == 1
    assert r.error.kind == "error"
    assert r.error.type == "PermanentError"
    assert metrics.retried == 0
    check_invariants(metrics)


def test_exception_not_in_retry_on_fails_at_once() -> None:
    with Pool(Raise("ValueError", retries=3, retry_on=(KeyError,)), procs=1) as pool:
        r = run_one(pool, "x")
    assert not r.ok and r.attempts == 1 and r.error.type == "ValueError"


def test_exception_in_retry_on_is_retried() -> None:
    with Pool(Raise("KeyError", retries=2, retry_on=(KeyError,)), procs=1) as pool:
        r = run_one(pool, "x")
    assert not r.ok and r.attempts == 3 and r.error.type == "KeyError"


def test_retry_on_decided_against_the_real_exception_object() -> None:
    # CustomRetryable subclasses KeyError: only the worker sees that relationship.
    assert issubclass(CustomRetryable, KeyError)
    with Pool(Raise("CustomRetryable", retries=2, retry_on=(KeyError,)), procs=1) as pool:
        r = run_one(pool, "x")
    assert not r.ok and r.attempts == 3 and r.error.type == "CustomRetryable"


@pytest.mark.parametrize(
    "kind, type_name, message",
    [
        ("lock", "LockError", "holds a lock and cannot be pickled"),
        ("twoarg", "TwoArgError", "code=7 detail=cannot be rebuilt"),
    ],
)
def test_unpicklable_exception_reported_as_plain_data(
    kind: str, type_name: str, message: str
) -> None:
    with Pool(RaiseUnpicklable(kind, retries=1), procs=1) as pool:
        r = run_one(pool, "x")
        after = run_jobs(pool, ["y"])[0]
        metrics = pool.metrics()
    assert not r.ok
    assert r.error.kind == "error"
    assert r.error.type == type_name
    assert message in r.error.message
    assert "raise_unpicklable_error" in r.error.traceback
    assert r.attempts == 2  # an ordinary error: retried
    assert r.error.exitcode is None
    # The worker survived: the same process ran the next job, and none was restarted.
    assert after.error.type == type_name and after.worker == r.worker
    assert metrics.worker_restarts == 0 and metrics.crashed == 0


def test_waiting_retry_does_not_occupy_a_worker(tmp_path: Path) -> None:
    # One worker. A fails its first attempt, then waits 1.0 s for its retry; B takes 0.1 s.
    # If the wait held the worker, A's retry would finish before B even started.
    task = Mixed(tmp_path, retries=1, backoff=1.0, jitter=0.0)
    payloads = [("A", "raise", 1, "a"), ("B", "sleep", None, 0.1)]
    arrivals = []
    with Pool(task, procs=1) as pool:
        for r in pool.imap(payloads, ordered=False):
            arrivals.append((time.monotonic(), r))
    assert [r.value for _, r in arrivals] == [0.1, "a"]
    (b_at, b), (a_at, a) = arrivals
    assert b.ok and b.attempts == 1
    assert a.ok and a.attempts == 2
    a_times = [at for at, _ in attempts_of(tmp_path, "A")]
    assert len(a_times) == 2
    assert a_times[1] - a_times[0] >= 1.0
    assert b_at < a_times[1]  # B was done before A's retry even started


def test_exception_with_broken_str_still_reported() -> None:
    with Pool(Raise("BadStrError", retries=1), procs=1) as pool:
        r = run_one(pool, "x")
        after = run_one(pool, "y")
        metrics = pool.metrics()
    # the worker is fine: it reported, and it ran the next job too
    assert after.attempts == 2 and after.error.type == "BadStrError" and after.worker == r.worker
    assert metrics.worker_restarts == 0 and metrics.crashed == 0
    assert not r.ok
    assert r.error.kind == "error"
    assert r.error.type == "BadStrError"
    assert r.attempts == 2
    assert isinstance(r.error.message, str)


@pytest.mark.parametrize("exc", ["SystemExit", "KeyboardInterrupt", "GeneratorExit"])
def test_base_exceptions_fail_at_once_without_killing_the_worker(exc: str) -> None:
    # Not in the default retry_on (Exception,): the job fails at once, as an "error".
    with Pool(Raise(exc, retries=3), procs=1) as pool:
        r = run_one(pool, "x")
        metrics = pool.metrics()
        after = pool.map([1, 2])
    assert not r.ok
    assert r.error.kind == "error"
    assert r.error.type == exc
    assert r.attempts == 1
    assert metrics.crashed == 0 and metrics.worker_restarts == 0
    assert [x.ok for x in after] == [False, False]  # Raise always raises; the pool answers
    assert {x.worker for x in after} == {r.worker}  # from the worker that was not killed
