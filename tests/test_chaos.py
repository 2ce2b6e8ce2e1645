"""Chaos: thousands of jobs, a mix of every failure, and workers SIGKILLed from outside."""

from __future__ import annotations

import os
import random
import signal
import threading
from collections import Counter
from pathlib import Path

import pytest
from faults import Chaos
from helpers import check_invariants

from batchpool import Pool

pytestmark = pytest.mark.timeout(120)

N = 2000
RETRIES = 5
KILL_EVERY = 0.2  # seconds between external SIGKILLs
KILLS = 15


def _killer(pool: Pool, stop: threading.Event, killed: list[int]) -> None:
    """SIGKILL a random worker every KILL_EVERY seconds. Only workers that have finished a job
    are picked: killing one that is still starting counts as a failed start, and three in a
    row would (rightly) break the pool."""
    rng = random.Random(1234)
    while len(killed) < KILLS and not stop.wait(KILL_EVERY):
        ready = [w.pid for w in pool.metrics().per_worker if w.jobs > 0]
        if not ready:
            continue
        pid = rng.choice(ready)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        killed.append(pid)


def test_chaos(tmp_path: Path) -> None:
    task = Chaos(tmp_path, work=0.003, retries=RETRIES, timeout=0.5, backoff=0.0)
    stop = threading.Event()
    killed: list[int] = []
    results = []
    with Pool(task, procs=2, start_method="forkserver") as pool:
        thread = threading.Thread(target=_killer, args=(pool, stop, killed), daemon=True)
        thread.start()
        try:
            for r in pool.imap(range(N), ordered=False):
                results.append(r)
        finally:
            stop.set()
            thread.join(10)
        metrics = pool.metrics()

    counts = Counter(r.index for r in results)
    assert len(results) == N
    assert set(counts) == set(range(N))
    assert max(counts.values()) == 1

    plans = Counter()
    for r in results:
        plan = Chaos.plan(r.index)
        plans[plan] += 1
        assert r.payload == r.index
        assert 1 <= r.attempts <= RETRIES + 1, r
        if plan == "raise":
            assert not r.ok and r.error.kind == "error" and r.error.type == "ValueError", r
            assert r.attempts == RETRIES + 1, r
        elif plan == "exit":
            assert not r.ok and r.error.kind == "crash", r
            assert r.attempts == RETRIES + 1, r
        else:
            assert r.ok, r
            assert r.value == r.index * r.index
            if plan != "ok":
                assert r.attempts >= 2, r

    check_invariants(metrics)
    assert metrics.submitted == N
    assert metrics.failed == plans["raise"] + plans["exit"]
    assert metrics.succeeded == N - metrics.failed
    # every crash-planned attempt crashed; hangs were timed out unless killed first
    assert metrics.crashed >= plans["exit"] * (RETRIES + 1) + plans["exit-once"]
    assert metrics.timed_out + metrics.crashed >= (
        plans["exit"] * (RETRIES + 1) + plans["exit-once"] + plans["kill-once"] + plans["hang-once"]
    )
    assert len(killed) >= 5, killed
