"""The fault matrix: every phase of a job's life x every way it can fail x every start method.

For each cell: the job that meets the fault ends with the expected outcome, the jobs beside it
are unaffected, and the pool (or, where workers cannot start at all, a fresh pool) still works.

Phases and the failures that make sense in them (the rest are left out on purpose):

    phase            where it runs   exception unpicklable exit sigkill hang
    payload-pickle   our process     yes       yes         -    -       -
    payload-unpickle worker          yes       -           yes  yes     yes
    start            worker          yes       yes*        yes  yes     -
    setup            worker          yes       yes         yes  yes     -
    run              worker          yes       yes         yes  yes     yes
    result           worker          yes       yes         yes  yes     yes
    result-unpickle  our process     yes       -           -    -       -

- exit / sigkill / hang while *our* process pickles a payload or unpickles a result would kill
  or block the test process itself (where the supervisor thread lives): not a pool failure.
- "unpicklable" while unpickling is the same cell as "exception" (a value that cannot be
  rebuilt raises while it is rebuilt).
- start*: a task that cannot be pickled at all fails Pool(...) construction, in our process.
- hang in start / setup: the SPEC has no startup deadline (Task.timeout bounds attempts), so
  there is no outcome to expect; a hung setup() is the user's to fix.

One outcome per cell, from the SPEC: an exception in run() is an "error"; a value that cannot
be pickled or rebuilt is "serialization" (one attempt, never retried); a worker that exits or
is killed is a "crash" and one that hangs a "timeout", whatever it was doing for the job
(unpickling its payload, running it, pickling its result), each retried like any failure; a
worker that cannot start or set up gives up the pool after three tries ("error").
"""

from __future__ import annotations

import threading

import pytest
from faults import Echo, FaultOnPickle, FaultOnUnpickle, FaultTask
from helpers import check_invariants, run_jobs

from batchpool import Pool
from batchpool.errors import PoolBroken

pytestmark = pytest.mark.timeout(60)

PROCS = 2
RETRIES = 1
TIMEOUT = 1.0
# Restarts a cell may cause at most: every attempt of the faulty job kills its worker, and the
# pool refills both slots; anything beyond this is a restart storm.
MAX_RESTARTS = (RETRIES + 1) + PROCS + 2

CELLS = [
    ("payload-pickle", "exception"),
    ("payload-pickle", "unpicklable"),
    ("payload-unpickle", "exception"),
    ("payload-unpickle", "exit"),
    ("payload-unpickle", "sigkill"),
    ("payload-unpickle", "hang"),
    ("start", "exception"),
    ("start", "unpicklable"),
    ("start", "exit"),
    ("start", "sigkill"),
    ("setup", "exception"),
    ("setup", "unpicklable"),
    ("setup", "exit"),
    ("setup", "sigkill"),
    ("run", "exception"),
    ("run", "unpicklable"),
    ("run", "exit"),
    ("run", "sigkill"),
    ("run", "hang"),
    ("result", "exception"),
    ("result", "unpicklable"),
    ("result", "exit"),
    ("result", "sigkill"),
    ("result", "hang"),
    ("result-unpickle", "exception"),
]

# kind and attempts of the faulty job, per failure, in the phases where the job runs
RUN_OUTCOME = {
    "exception": ("error", RETRIES + 1, "ValueError", None),
    "unpicklable": ("error", RETRIES + 1, "LockError", None),
    "exit": ("crash", RETRIES + 1, "WorkerCrashed", 13),
    "sigkill": ("crash", RETRIES + 1, "WorkerCrashed", -9),
    "hang": ("timeout", RETRIES + 1, "TimeoutError", None),
}


def _pool(task, start_method: str) -> Pool:
    return Pool(
        task, procs=PROCS, start_method=start_method, retries=RETRIES, timeout=TIMEOUT, backoff=0
    )


def _faulty_payload(phase: str, failure: str):
    if phase == "payload-pickle":
        return threading.Lock() if failure == "unpicklable" else FaultOnPickle(failure)
    if phase == "payload-unpickle":
        return FaultOnUnpickle(failure)
    return "fault"


def _fresh_pool_works(start_method: str) -> None:
    with Pool(Echo(), procs=PROCS, start_method=start_method) as pool:
        assert [r.value for r in run_jobs(pool, range(5), timeout=30)] == list(range(5))


def _check_serialization(r) -> None:
    assert r.error.kind == "serialization", r
    assert r.attempts == 1, r


@pytest.mark.parametrize("phase, failure", CELLS, ids=[f"{p}-{f}" for p, f in CELLS])
def test_fault_matrix(phase: str, failure: str, start_method: str) -> None:
    if phase == "start" and failure == "unpicklable":
        with pytest.raises(TypeError, match="the task cannot be pickled"):
            Pool(FaultTask("run", "exception", lock=threading.Lock()), procs=PROCS)
        _fresh_pool_works(start_method)
        return

    task = FaultTask(phase, failure)
    if phase in ("start", "setup"):
        _check_broken_pool(task, phase, failure, start_method)
        _fresh_pool_works(start_method)
        return

    payloads = [_faulty_payload(phase, failure), 1, 2, 3]
    with _pool(task, start_method) as pool:
        results = run_jobs(pool, payloads, timeout=15, max_restarts=MAX_RESTARTS)
        r = results[0]
        assert not r.ok and r.value is None
        assert r.error.type and r.error.message

        if phase == "run" or failure in ("exit", "sigkill", "hang"):
            # A worker that dies or hangs is a crash or a timeout whatever it was doing for
            # the job (SPEC: "the worker died ... while the job ran"): retried like any failure.
            kind, attempts, type_name, exitcode = RUN_OUTCOME[failure]
            assert (r.error.kind, r.attempts, r.error.type) == (kind, attempts, type_name), r
            assert r.error.exitcode == exitcode, r
        else:
            # a value that cannot be pickled or rebuilt: charged once, never retried
            _check_serialization(r)
        if phase == "run" and failure in ("exception", "unpicklable"):
            assert "do_fault" in r.error.traceback
        if failure == "exception":
            assert r.error.type == "ValueError", r

        for i, other in enumerate(results[1:], start=1):
            assert other.ok and other.value == i, other
            assert other.attempts == 1, other

        # the same pool still works
        after = run_jobs(pool, range(5), timeout=30, max_restarts=MAX_RESTARTS)
        assert [x.value for x in after] == list(range(5))
        assert all(x.ok and x.attempts == 1 for x in after)
        check_invariants(pool.metrics())


def _check_broken_pool(task, phase: str, failure: str, start_method: str) -> None:
    with _pool(task, start_method) as pool:
        results = run_jobs(pool, range(4), timeout=30, max_restarts=3 + PROCS)
        for r in results:
            assert not r.ok
            assert r.error.kind == "error", r
            if failure == "exception":
                assert r.error.type == "ValueError", r
                assert "injected fault" in r.error.message
            elif failure == "unpicklable":
                assert r.error.type == "LockError", r
        with pytest.raises(PoolBroken):
            pool.submit(0)
        m = pool.metrics()
        assert m.worker_restarts <= 3 + PROCS
        assert m.failed == m.submitted == 4
