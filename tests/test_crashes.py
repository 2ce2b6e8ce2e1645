"""Crashes: a worker dying mid-job fails that attempt as "crash"; the pool heals."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from faults import (
    ExitTimes,
    KillSelfTimes,
    Mixed,
    Segfault,
    SetupFails,
    SetupFailsOnce,
    SleepMarked,
    attempts_of,
    marks_by_pid,
)
from helpers import check_invariants, run_jobs, wait_for

from batchpool import Pool
from batchpool.errors import PoolBroken

pytestmark = pytest.mark.timeout(90)


def _assert_crash(r, exitcode: int, attempts: int) -> None:
    assert not r.ok
    assert r.value is None
    assert r.error.kind == "crash"
    assert r.error.type == "WorkerCrashed"
    assert r.error.exitcode == exitcode
    assert r.attempts == attempts


def test_exit_crash(tmp_path: Path, start_method: str) -> None:
    with Pool(ExitTimes(None, tmp_path, retries=1), procs=2, start_method=start_method) as pool:
        r = run_jobs(pool, ["boom"], timeout=60)[0]
        _assert_crash(r, 13, 2)
        assert len(attempts_of(tmp_path, "boom")) == 2
        metrics = pool.metrics()
        assert metrics.crashed == 2
        assert metrics.worker_restarts >= 2
        check_invariants(metrics)


def test_sigkill_self_crash(tmp_path: Path, start_method: str) -> None:
    with Pool(KillSelfTimes(None, tmp_path, retries=2), procs=2, start_method=start_method) as p:
        r = run_jobs(p, ["boom"], timeout=60)[0]
    _assert_crash(r, -signal.SIGKILL, 3)


def test_segfault_crash() -> None:
    with Pool(Segfault(retries=0), procs=1) as pool:
        results = run_jobs(pool, ["segv", "fine"], timeout=60)
    _assert_crash(results[0], -signal.SIGSEGV, 1)
    assert results[1].ok and results[1].value == "fine"


def test_crash_retried_can_succeed(tmp_path: Path) -> None:
    with Pool(ExitTimes(1, tmp_path, retries=3), procs=2) as pool:
        results = run_jobs(pool, ["a", "b"], timeout=60)
        metrics = pool.metrics()
    for r in results:
        assert r.ok and r.value == r.payload
        assert r.attempts == 2
    assert metrics.crashed == 2
    assert metrics.retried == 2
    check_invariants(metrics)


def test_other_jobs_unaffected_by_crash(tmp_path: Path) -> None:
    # chunksize 10: the crashing job shares a message with 9 others; only it is charged.
    payloads = [f"ok{i}" for i in range(10)]
    payloads[4] = "boom"

    mixed = [(p, "exit", None, p) if p == "boom" else (p, "ok", None, p) for p in payloads]
    with Pool(Mixed(tmp_path, retries=1), procs=1, chunksize=10) as pool:
        results = run_jobs(pool, mixed, timeout=60)
    _assert_crash(results[4], 13, 2)
    for i, r in enumerate(results):
        if i != 4:
            assert r.ok and r.value == payloads[i]
            assert r.attempts == 1, r  # held but not started: re-queued without an attempt


def test_external_sigkill_of_busy_worker(tmp_path: Path) -> None:
    task = SleepMarked(tmp_path, seconds=30.0, retries=2)
    with Pool(task, procs=2) as pool:
        victim = pool.submit("slow-victim")
        [(_, pid)] = wait_for(
            lambda: attempts_of(tmp_path, "slow-victim"), 30, "the victim job to start"
        )
        others = [pool.submit(f"other{i}") for i in range(6)]
        os.kill(pid, signal.SIGKILL)
        r = victim.result(timeout=60)
        rest = [f.result(timeout=60) for f in others]
        metrics = pool.metrics()
    assert r.ok and r.attempts == 2
    assert r.worker != pid
    assert all(x.ok and x.attempts == 1 for x in rest)
    assert metrics.crashed == 1
    assert metrics.retried == 1
    check_invariants(metrics)


def test_setup_always_failing_breaks_the_pool(tmp_path: Path) -> None:
    procs = 2
    with Pool(SetupFails(tmp_path), procs=procs) as pool:
        results = run_jobs(pool, range(5), timeout=60)
        for r in results:
            assert not r.ok
            assert r.error.kind == "error"
            assert r.error.type == "RuntimeError"
            assert "setup boom" in r.error.message
        wait_for(lambda: not pool.pids(), 10, "no workers left")
        with pytest.raises(PoolBroken):
            pool.submit(1)
        with pytest.raises(PoolBroken):
            pool.map([1])
        setups = sum(marks_by_pid(tmp_path, "setup").values())
        assert 3 <= setups <= 3 + procs, setups
        metrics = pool.metrics()
        assert metrics.failed == metrics.submitted == 5
    # no restart storm, not even at close
    assert sum(marks_by_pid(tmp_path, "setup").values()) == setups


def test_setup_failing_once_recovers(tmp_path: Path) -> None:
    with Pool(SetupFailsOnce(tmp_path), procs=2) as pool:
        results = run_jobs(pool, range(10), timeout=60)
    assert all(r.ok and r.attempts == 1 for r in results), results
    assert len(attempts_of(tmp_path, "setup")) >= 2  # the failed start, then one that worked


def test_crash_does_not_lose_jobs_under_load(tmp_path: Path) -> None:
    payloads = [(i, "exit", 1, i) if i % 10 == 5 else (i, "ok", None, i) for i in range(100)]
    with Pool(Mixed(tmp_path, retries=2), procs=2) as pool:
        results = run_jobs(pool, payloads, timeout=60)
        metrics = pool.metrics()
    assert [r.value for r in results] == list(range(100))
    assert all(r.ok for r in results)
    assert all(r.attempts == (2 if i % 10 == 5 else 1) for i, r in enumerate(results))
    assert metrics.crashed == 10
    check_invariants(metrics)


def test_clean_exit_mid_job_is_a_crash(tmp_path: Path) -> None:
    # os._exit(0) in the middle of a job is no clean shutdown: the job did not finish.
    with Pool(ExitTimes(None, tmp_path, code=0, retries=1), procs=1) as pool:
        r = run_jobs(pool, ["a"], timeout=60, max_restarts=6)[0]
    _assert_crash(r, 0, 2)
