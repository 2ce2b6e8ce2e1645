"""Worker recycling: max_tasks_per_worker and max_memory retire workers between jobs."""

from __future__ import annotations

from collections import Counter

import psutil
import pytest
from faults import MemoryHog, RecordPid
from helpers import check_invariants, run_jobs

from batchpool import Pool

pytestmark = pytest.mark.timeout(90)


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
def test_max_tasks_per_worker(start_method: str) -> None:
    with Pool(RecordPid(), procs=2, max_tasks_per_worker=3, start_method=start_method) as pool:
        results = pool.map(range(12))
        metrics = pool.metrics()
    assert all(r.ok and r.attempts == 1 for r in results)
    per_pid = Counter(r.value for r in results)
    assert all(n <= 3 for n in per_pid.values()), per_pid
    assert len(per_pid) >= 4
    assert all(r.worker == r.value for r in results)
    assert metrics.worker_restarts >= 2
    check_invariants(metrics)


def test_max_tasks_per_worker_with_submit() -> None:
    with Pool(RecordPid(), procs=1, max_tasks_per_worker=1) as pool:
        results = run_jobs(pool, range(5), timeout=60)
    assert len({r.value for r in results}) == 5


def _baseline_rss() -> int:
    """RSS of an idle worker, measured, so the limit below is meaningful on any machine."""
    with Pool(RecordPid(), procs=1) as pool:
        pid = pool.map([0])[0].value
        return psutil.Process(pid).memory_info().rss


def test_max_memory_retires_worker() -> None:
    limit = _baseline_rss() + 40 * 1024 * 1024
    with Pool(MemoryHog(60), procs=2, max_memory=limit) as pool:
        results = pool.map(range(6))
        metrics = pool.metrics()
    assert all(r.ok and r.attempts == 1 for r in results)
    per_pid = Counter(r.value for r in results)
    # each job pushes its worker past the limit: every worker retires after one job
    assert all(n == 1 for n in per_pid.values()), per_pid
    assert metrics.worker_restarts >= 4
    check_invariants(metrics)


def test_max_memory_not_reached_keeps_workers() -> None:
    limit = _baseline_rss() + 500 * 1024 * 1024
    with Pool(MemoryHog(1), procs=2, max_memory=limit) as pool:
        results = pool.map(range(20))
        metrics = pool.metrics()
    assert all(r.ok for r in results)
    assert len({r.value for r in results}) <= 2
    assert metrics.worker_restarts == 0
