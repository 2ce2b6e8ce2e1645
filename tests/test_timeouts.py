"""Timeouts: a hung attempt's worker is killed and replaced; the job fails as "timeout"."""

from __future__ import annotations

import pytest
from faults import Hang, Sleep
from helpers import check_invariants, pid_gone, run_jobs, wait_for

from batchpool import Pool

pytestmark = pytest.mark.timeout(90)


def test_hang_killed_past_timeout(start_method: str) -> None:
    _check_hang_killed("hang", start_method)  # sleeping in C


def test_busy_loop_killed_past_timeout() -> None:
    _check_hang_killed("spin", "forkserver")  # spinning in Python


def _check_hang_killed(payload: str, start_method: str) -> None:
    with Pool(Hang(timeout=0.5, retries=1), procs=2, start_method=start_method) as pool:
        wait_for(lambda: len(pool.pids()) == 2, 30, "two workers")
        before = set(pool.pids())
        results = run_jobs(pool, [payload, 1, 2, 3], timeout=30)
        r = results[0]
        assert not r.ok
        assert r.error.kind == "timeout"
        assert r.error.type == "TimeoutError"
        assert r.attempts == 2
        assert r.value is None
        assert 0.4 <= r.elapsed < 10
        assert [x.value for x in results[1:]] == [1, 2, 3]
        assert all(x.ok and x.attempts == 1 for x in results[1:])
        # the worker that hung is gone, and replaced
        assert r.worker not in pool.pids()
        assert pid_gone(r.worker)
        wait_for(lambda: len(pool.pids()) == 2, 30, "replacement workers")
        assert set(pool.pids()) != before
        metrics = pool.metrics()
        assert metrics.timed_out == 2
        assert metrics.worker_restarts >= 2
        # still works
        after = pool.map(range(5))
        assert [x.value for x in after] == list(range(5))
        check_invariants(pool.metrics())


def test_job_shorter_than_timeout_unaffected() -> None:
    with Pool(Sleep(0.2, timeout=3.0, retries=0), procs=2) as pool:
        results = pool.map(range(4))
        metrics = pool.metrics()
    assert all(r.ok and r.attempts == 1 for r in results)
    assert metrics.timed_out == 0
    assert metrics.worker_restarts == 0


def test_timeout_is_per_attempt_not_per_batch() -> None:
    # 40 jobs of 0.05 s each take 1 s per worker; none of them exceeds the 0.5 s timeout.
    with Pool(Sleep(0.05, timeout=0.5, retries=0), procs=2) as pool:
        results = pool.map(range(40))
        metrics = pool.metrics()
    assert all(r.ok and r.attempts == 1 for r in results), [r.error for r in results]
    assert metrics.timed_out == 0


def test_pool_timeout_override() -> None:
    with Pool(Hang(retries=0), procs=1, timeout=0.5) as pool:
        r = run_jobs(pool, ["hang"], timeout=30)[0]
        assert r.error is not None and r.error.kind == "timeout" and r.attempts == 1
        assert [x.value for x in pool.map(range(3))] == [0, 1, 2]


def test_pool_timeout_override_lengthens_task_timeout() -> None:
    with Pool(Sleep(0.6, timeout=0.2, retries=0), procs=1, timeout=10.0) as pool:
        r = run_jobs(pool, ["x"], timeout=30)[0]
    assert r.ok and r.attempts == 1


def test_hang_inside_a_batch_is_charged_to_its_own_job() -> None:
    # With chunksize 20 all jobs travel in one message: the hang must be charged to job 7
    # alone; the others complete, and those after it lose no attempt.
    payloads = list(range(20))
    payloads[7] = "hang"
    with Pool(Hang(timeout=0.5, retries=0), procs=1, chunksize=20) as pool:
        results = run_jobs(pool, payloads, timeout=30)
    assert results[7].error is not None and results[7].error.kind == "timeout"
    assert results[7].attempts == 1
    for i, r in enumerate(results):
        if i != 7:
            assert r.ok and r.value == i, r
            assert r.attempts == 1, r


def test_timeout_kill_leaves_no_grandchild(tmp_path) -> None:
    # The hung worker had started a process of its own: killing the worker must not leave it
    # running (the leak fixture would also catch it; this names the culprit).
    from faults import SpawnChildAndHang

    with Pool(SpawnChildAndHang(tmp_path, timeout=1.0, retries=0), procs=1) as pool:
        r = run_jobs(pool, ["x"], timeout=30)[0]
    assert r.error is not None and r.error.kind == "timeout"
    grandchildren = [int(p.name.split("-")[1].split(".")[0]) for p in tmp_path.glob("grandchild-*")]
    assert len(grandchildren) == 1
    wait_for(lambda: all(pid_gone(p) for p in grandchildren), 5, "the grandchild to be killed")
