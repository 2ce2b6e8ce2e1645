"""Jobs in blocks (jobs.Block): a map() travels as a few records, and a job gets a record of
its own only where its way parts from its batch-mates'. Real workers run whole batches out of
one block here; a failure inside a batch is charged to exactly its own job."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from pathlib import Path

import pytest
from faults import Echo, FailsUnpickle, Hang, Mixed, RefusesPickle, Square, UnpicklableResult
from helpers import check_invariants

from batchpool import JobResult, Pool

pytestmark = pytest.mark.timeout(90)


def _ok(i: int) -> tuple:
    return (i, "ok", None, i)


def test_a_crash_inside_a_batch_of_1000_charges_exactly_one_job(tmp_path: Path) -> None:
    payloads = [_ok(i) for i in range(1000)]
    payloads[500] = (500, "exit", None, 500)
    # chunksize 1000: the whole map is one block, sent as one message
    with Pool(Mixed(tmp_path, retries=0), procs=1, chunksize=1000) as pool:
        results = pool.map(payloads)
        metrics = pool.metrics()
    assert [r.index for r in results] == list(range(1000))
    crash = results[500]
    assert crash.error is not None and crash.error.kind == "crash" and crash.attempts == 1
    others = results[:500] + results[501:]
    assert all(r.ok and r.attempts == 1 for r in others)
    assert [r.value for r in others] == [i for i in range(1000) if i != 500]
    assert metrics.crashed == 1 and metrics.failed == 1 and metrics.succeeded == 999
    assert metrics.started == 1000  # the batch-mates lost to the crash reran uncharged
    check_invariants(metrics)


def test_a_hang_inside_a_mapped_batch_times_out_alone() -> None:
    payloads: list = list(range(300))
    payloads[150] = "hang"
    with Pool(Hang(timeout=0.5, retries=0), procs=1, chunksize=300) as pool:
        results = pool.map(payloads)
        metrics = pool.metrics()
    hung = results[150]
    assert hung.error is not None and hung.error.kind == "timeout" and hung.attempts == 1
    assert all(r.ok and r.value == i and r.attempts == 1 for i, r in enumerate(results) if i != 150)
    assert metrics.timed_out == 1 and metrics.started == 300
    check_invariants(metrics)


def test_errors_inside_a_batch_retry_alone_and_results_keep_their_order(tmp_path: Path) -> None:
    failing = {3, 50, 99}
    payloads = [(i, "raise", 1, i) if i in failing else _ok(i) for i in range(100)]
    with Pool(Mixed(tmp_path, retries=2), procs=2, chunksize=100) as pool:
        results = pool.map(payloads)
        streamed = list(pool.imap(payloads[:10], ordered=True))
        metrics = pool.metrics()
    assert [r.value for r in results] == list(range(100))
    assert [r.attempts for r in results] == [2 if i in failing else 1 for i in range(100)]
    assert [r.value for r in streamed] == list(range(10))
    assert metrics.retried == 3
    check_invariants(metrics)


def test_a_batch_crosses_stages_together_and_a_failure_stays_its_own() -> None:
    tasks = [Echo(), Square(fail=frozenset({7}))]
    pool = Pool._for_stages(tasks, 2, chunksize=100)
    with pool:
        results = pool.map(range(100))
        metrics = pool.metrics()
    assert [r.value for r in results if r.index != 7] == [i * i for i in range(100) if i != 7]
    assert results[7].error is not None and results[7].error.type == "PermanentError"
    assert [r.payload for r in results] == list(range(100))
    assert all(r.attempts == 2 for r in results)  # one per stage
    assert [s.succeeded for s in metrics.stages] == [100, 99]
    assert metrics.failed == 1
    check_invariants(metrics)


@pytest.mark.parametrize(
    "task, bad",
    [
        (Echo(), RefusesPickle()),  # cannot be pickled here: fails before it is sent
        (Echo(), FailsUnpickle()),  # the worker cannot load the batch: each job runs alone
        (UnpicklableResult(), "unload"),  # its value does not load here: each job runs alone
    ],
    ids=["payload-unpicklable", "payload-unloadable", "value-unloadable"],
)
def test_a_serialization_failure_inside_a_batch_is_charged_to_its_job(task, bad) -> None:
    payloads = [f"p{i}" for i in range(10)]
    payloads[6] = bad
    with Pool(task, procs=1, chunksize=10) as pool:
        results = pool.map(payloads)
        metrics = pool.metrics()
    assert results[6].error is not None and results[6].error.kind == "serialization"
    assert results[6].attempts == 1
    others = results[:6] + results[7:]
    assert [r.value for r in others] == [f"p{i}" for i in range(10) if i != 6]
    assert all(r.ok and r.attempts == 1 for r in others)
    assert metrics.failed == 1 and metrics.retried == 0
    check_invariants(metrics)


def test_results_built_for_a_batch_are_frozen_dataclasses_like_any_other() -> None:
    with Pool(Echo(), procs=1) as pool:
        result = pool.map(["a", "b"])[1]
    assert type(result) is JobResult
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.value = "c"  # type: ignore[misc]
    assert dataclasses.asdict(result)["value"] == "b"
    changed = dataclasses.replace(result, value="c")
    assert (changed.value, result.value) == ("c", "b")
    made = JobResult(1, "b", "b", None, 1, result.elapsed, result.worker)
    assert result == made and hash(result) == hash(made)
    assert pickle.loads(pickle.dumps(result)) == result == copy.deepcopy(result)
