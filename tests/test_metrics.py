"""Metrics: the SPEC's invariants after a mixed run, per-worker statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
from faults import Echo, Mixed
from helpers import check_invariants, run_jobs, wait_for

from batchpool import Metrics, Pool

pytestmark = pytest.mark.timeout(90)


def _mixed_payloads() -> tuple[list, dict[str, int]]:
    payloads = []
    for i in range(10):
        payloads.append((f"ok{i}", "sleep", None, 0.01))
    for i in range(3):
        payloads.append((f"once{i}", "raise", 1, f"once{i}"))  # 1 retry, then ok
    for i in range(2):
        payloads.append((f"always{i}", "raise", None, None))  # retries + 1 attempts, fails
    payloads.append(("crash", "exit", 1, "crash"))  # 1 crash, then ok
    payloads.append(("perm", "permanent", None, None))  # fails at once
    expected = {
        "submitted": 17,
        "succeeded": 14,
        "failed": 3,
        "retried": 3 + 2 * 2 + 1,
        "crashed": 1,
    }
    return payloads, expected


def test_invariants_after_a_mixed_run(tmp_path: Path) -> None:
    payloads, expected = _mixed_payloads()
    with Pool(Mixed(tmp_path, retries=2), procs=2) as pool:
        results = run_jobs(pool, payloads, timeout=60)
        wait_for(lambda: pool.metrics().workers == 2, 30, "the crashed worker replaced")
        m = pool.metrics()
    assert isinstance(m, Metrics)
    check_invariants(m)
    for name, value in expected.items():
        assert getattr(m, name) == value, (name, m)
    assert m.started == m.succeeded + m.failed + m.retried == 14 + 3 + 8
    assert m.timed_out == 0
    assert m.worker_restarts >= 1
    assert m.elapsed > 0
    assert sum(r.ok for r in results) == m.succeeded
    assert sum(r.attempts for r in results) == m.started


def test_per_worker_stats(tmp_path: Path) -> None:
    with Pool(Mixed(tmp_path), procs=2) as pool:
        results = pool.map([(i, "sleep", None, 0.02) for i in range(20)])
        assert all(r.ok for r in results)
        wait_for(
            lambda: all(w.rss > 0 for w in pool.metrics().per_worker),
            10,
            "an RSS sample of every worker",
        )
        m = pool.metrics()
        pids = set(pool.pids())
    assert m.workers == 2
    assert {w.pid for w in m.per_worker} == pids
    assert sum(w.jobs for w in m.per_worker) == 20
    for w in m.per_worker:
        assert w.rss > 1024 * 1024  # a Python process is megabytes
        if w.jobs:
            assert w.busy >= 0.02 * w.jobs * 0.9
    assert sum(w.busy for w in m.per_worker) >= 20 * 0.02 * 0.9
    busy_workers = {r.worker for r in results}
    assert busy_workers <= pids


def test_metrics_before_and_after_running() -> None:
    pool = Pool(Echo(), procs=2)
    try:
        m0 = pool.metrics()
        assert m0.submitted == m0.started == m0.succeeded == m0.failed == 0
        pool.map(range(10))
        m1 = pool.metrics()
        check_invariants(m1)
        assert m1.submitted == m1.succeeded == 10
        assert m1.elapsed >= m0.elapsed
    finally:
        pool.close()
    m2 = pool.metrics()  # still callable after close
    assert m2.submitted == 10
    assert m2.workers == 0
    check_invariants(m2)
