"""The Pool facade: map, imap, submit, results, metrics, setup/teardown, task pickling."""

from __future__ import annotations

import gc
import itertools
import json
import multiprocessing
import os
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, wait
from pathlib import Path
from typing import Any

import psutil
import pytest
from faults import (
    CountSetup,
    CountUnpickles,
    Echo,
    Hang,
    Raise,
    RecordPid,
    Sleep,
    SleepPid,
    Square,
    marks_by_pid,
)
from helpers import all_gone, run, wait_for

from batchpool import JobFailed, JobResult, Metrics, Pool
from batchpool.errors import PoolClosed
from batchpool.serve.command import SERVING
from batchpool.sizing import MAX_BATCH
from batchpool.streaming import SUBMIT_CHUNK, WINDOW_BATCHES

pytestmark = pytest.mark.timeout(90)


def test_map_values_in_input_order(start_method: str) -> None:
    with Pool(Square(), procs=2, start_method=start_method) as pool:
        results = pool.map(range(40))
        pids = set(pool.pids())
    assert [r.value for r in results] == [i * i for i in range(40)]
    for i, r in enumerate(results):
        assert isinstance(r, JobResult)
        assert r.index == i
        assert r.payload == i
        assert r.ok and r.error is None
        assert r.attempts == 1
        assert r.elapsed >= 0
        assert r.worker in pids


def test_map_accepts_a_generator_and_empty_input() -> None:
    with Pool(Echo(), procs=2) as pool:
        assert [r.value for r in pool.map(x for x in "abc")] == ["a", "b", "c"]
        assert pool.map([]) == []
        assert list(pool.imap([])) == []


def test_map_reports_failures_as_results() -> None:
    with Pool(Raise("PermanentError"), procs=2) as pool:
        results = pool.map([1, 2])
    for i, r in enumerate(results):
        assert not r.ok
        assert r.value is None
        assert r.index == i
        assert r.error.kind == "error"
        assert r.error.type == "PermanentError"
        assert f"raised for {i + 1}" in r.error.message


def test_imap_ordered() -> None:
    # The first job is the slowest: ordered imap must still yield by index.
    payloads = [0.6] + [0.0] * 15
    with Pool(Sleep(), procs=2) as pool:
        results = list(pool.imap(payloads))
    assert [r.index for r in results] == list(range(16))
    assert [r.value for r in results] == payloads


def test_imap_unordered_returns_everything_as_it_completes() -> None:
    payloads = [1.5] + [0.0] * 15
    with Pool(Sleep(), procs=2) as pool:
        results = list(pool.imap(payloads, ordered=False))
    assert sorted(r.index for r in results) == list(range(16))
    assert all(r.ok and r.value == payloads[r.index] for r in results)
    # index 0 sleeps 1.5 s while the other worker finishes the rest: it cannot come first.
    assert results[0].index != 0


@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
def test_imap_consumes_a_lazy_generator_with_backpressure(ordered: bool) -> None:
    pulled = 0

    def source():
        nonlocal pulled
        for i in range(10**9):
            pulled += 1
            yield i

    with Pool(Square(), procs=2) as pool:
        it = pool.imap(source(), ordered=ordered)
        # the largest window (batches measured full), and a block's reading
        read_ahead = WINDOW_BATCHES * MAX_BATCH * 2 + SUBMIT_CHUNK
        seen = set()
        for consumed, r in enumerate(it, start=1):
            assert r.ok and r.value == r.index * r.index
            seen.add(r.index)
            assert pulled - consumed <= read_ahead, (pulled, consumed)
            if consumed == 3000:
                break
        it.close()
    assert len(seen) == 3000
    if ordered:
        assert seen == set(range(3000))
    assert pulled <= 3000 + read_ahead


def test_imap_is_lazy_until_iterated_then_bounded() -> None:
    pulled = 0

    def source():
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield i

    with Pool(Echo(), procs=2) as pool:
        it = pool.imap(source())
        # The pool serves other work meanwhile; the iterator that nobody iterates reads nothing.
        assert pool.submit("other").result(timeout=30).value == "other"
        assert pulled == 0 and pool.metrics().submitted == 1
        first = next(it)
        assert first.index == 0 and first.value == 0
        # a bounded window ahead of the consumer (at most full batches for both workers), not
        # the input
        assert 1 <= pulled <= WINDOW_BATCHES * MAX_BATCH * 2
        it.close()


def test_submit_returns_future_of_jobresult() -> None:
    with Pool(Square(), procs=2) as pool:
        futures = [pool.submit(i) for i in range(5)]
        assert all(isinstance(f, Future) for f in futures)
        results = [f.result(timeout=30) for f in futures]
    assert [r.value for r in results] == [0, 1, 4, 9, 16]
    assert [r.payload for r in results] == [0, 1, 2, 3, 4]
    # submit() indexes count submits, 0-based.
    assert [r.index for r in results] == [0, 1, 2, 3, 4]
    assert all(r.ok and r.attempts == 1 for r in results)


def test_a_resolved_future_and_its_job_make_no_garbage_cycle() -> None:
    """Freed by reference counting, not left for the cyclic GC: a server submits a job per
    request, and each full collection paused it longer."""
    with Pool(Square(), procs=1) as pool:
        for f in [pool.submit(i) for i in range(20)]:  # warm: whatever start-up leaves
            f.result(timeout=30)
        gc.collect()
        gc.disable()
        try:
            futures = [pool.submit(i) for i in range(300)]
            assert [f.result(timeout=30).value for f in futures] == [i * i for i in range(300)]
            del futures
            garbage = gc.collect()
        finally:
            gc.enable()
    assert garbage < 100  # a cycle per job left 14 objects each: 4,200


def test_submit_failed_job_resolves_not_raises() -> None:
    with Pool(Raise("ValueError"), procs=1, retries=0) as pool:
        result = pool.submit("x").result(timeout=30)
    assert isinstance(result, JobResult)
    assert not result.ok
    assert result.error.type == "ValueError"


def test_unwrap() -> None:
    with Pool(Echo(), procs=1) as pool:
        assert pool.submit(41).result(timeout=30).unwrap() == 41
    with Pool(Raise("ValueError"), procs=1, retries=1) as pool:
        result = pool.submit("x").result(timeout=30)
    assert result.attempts == 2
    with pytest.raises(JobFailed) as info:
        result.unwrap()
    assert info.value.result is result
    assert "ValueError" in str(info.value)


def test_submit_and_map_after_close_raise_pool_closed() -> None:
    pool = Pool(Echo(), procs=1)
    pool.close()
    with pytest.raises(PoolClosed):
        pool.submit(1)
    with pytest.raises(PoolClosed):
        pool.map([1])
    with pytest.raises(PoolClosed):
        pool.imap([1])


def test_defaults_cpu_count_workers_started_by_the_forkserver() -> None:
    """SPEC: procs defaults to os.cpu_count(); the start method to forkserver where the platform
    has it (fork after the supervisor's threads is unsafe), else spawn. A forkserver's workers
    are children of the server, not of this process."""
    with Pool(RecordPid()) as pool:
        wait_for(lambda: len(pool.pids()) == os.cpu_count(), 30, "os.cpu_count() workers")
        parents = {psutil.Process(pid).parent() for pid in pool.pids()}
        assert len(pool.map(range(4))) == 4
        assert pool.metrics().workers == os.cpu_count()
    if "forkserver" not in multiprocessing.get_all_start_methods():
        assert {p.pid for p in parents} == {os.getpid()}  # spawned by this process
        return
    [server] = parents
    assert server.pid != os.getpid() and server.ppid() == os.getpid()
    assert "forkserver" in " ".join(server.cmdline())


def test_pids_are_live_workers() -> None:
    with Pool(Echo(), procs=2) as pool:
        wait_for(lambda: len(pool.pids()) == 2, 30, "two workers")
        pids = pool.pids()
        assert all(isinstance(p, int) for p in pids)
        assert len(set(pids)) == 2
    wait_for(lambda: all_gone(pids), 5, "workers gone after close")


def test_metrics_from_another_thread_while_running() -> None:
    snapshots: list[Metrics] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def poll(pool: Pool) -> None:
        try:
            while not stop.is_set():
                snapshots.append(pool.metrics())
                stop.wait(0.005)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    with Pool(Sleep(0.01), procs=2) as pool:
        thread = threading.Thread(target=poll, args=(pool,))
        thread.start()
        try:
            results = pool.map(range(100))
        finally:
            stop.set()
            thread.join(10)
        final = pool.metrics()
    assert not errors, errors
    assert all(r.ok for r in results)
    assert len(snapshots) >= 5
    previous = None
    for m in snapshots:
        assert isinstance(m, Metrics)
        assert 0 <= m.succeeded + m.failed <= m.submitted <= 100
        assert m.in_flight >= 0 and m.queued >= 0
        # one consistent snapshot: every attempt started is finished, retried, or in flight
        assert m.started == m.succeeded + m.failed + m.retried + m.in_flight, m
        if previous is not None:
            # started may fall: jobs a worker hands back unstarted (STEAL) leave it again
            assert m.succeeded >= previous.succeeded
            assert m.started + m.queued >= previous.started + previous.queued
            assert m.elapsed >= previous.elapsed
        previous = m
    assert final.submitted == final.succeeded == final.started == 100


def test_setup_once_per_worker_and_teardown_at_close(tmp_path: Path) -> None:
    with Pool(CountSetup(tmp_path), procs=2) as pool:
        results = pool.map(range(50))
        pids = pool.pids()
    assert all(r.ok for r in results)
    setups = marks_by_pid(tmp_path, "setup")
    teardowns = marks_by_pid(tmp_path, "teardown")
    assert set(setups) == set(pids)
    assert all(n == 1 for n in setups.values()), setups
    assert {r.value for r in results} <= set(setups)
    assert {r.worker for r in results} == {r.value for r in results}
    assert teardowns == setups  # one teardown per worker, at the clean close


def test_task_pickled_once_per_worker(tmp_path: Path, start_method: str) -> None:
    with Pool(CountUnpickles(tmp_path), procs=2, start_method=start_method) as pool:
        results = pool.map(range(200))
        more = [pool.submit(i).result(timeout=30) for i in range(10)]
    worker_pids = {r.value for r in results + more}
    per_pid = marks_by_pid(tmp_path, "unpickle")
    for pid in worker_pids:
        assert per_pid.get(pid) == 1, per_pid
    assert all(n <= 1 for n in per_pid.values()), per_pid


def test_results_carry_the_worker_pid() -> None:
    with Pool(Sleep(0.0), procs=2) as pool:
        results = pool.map(range(20))
        pids = set(pool.pids())
    assert set(Counter(r.worker for r in results)) <= pids


def test_concurrent_maps_from_two_threads_do_not_mix() -> None:
    outputs: dict[str, list] = {}

    def run(name: str, pool: Pool) -> None:
        outputs[name] = pool.map([(name, i) for i in range(300)])

    with Pool(Echo(), procs=2) as pool:
        threads = [threading.Thread(target=run, args=(n, pool)) for n in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
    for name in ("a", "b"):
        results = outputs[name]
        assert [r.value for r in results] == [(name, i) for i in range(300)]
        assert [r.index for r in results] == list(range(300))


def test_concurrent_submits_get_unique_indexes() -> None:
    futures: list[Future] = []
    lock = threading.Lock()

    def submit_many(pool: Pool) -> None:
        for i in range(100):
            f = pool.submit(i)
            with lock:
                futures.append(f)

    with Pool(Echo(), procs=2) as pool:
        threads = [threading.Thread(target=submit_many, args=(pool,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        results = [f.result(timeout=60) for f in futures]
    assert sorted(r.index for r in results) == list(range(400))


def test_future_callbacks_may_submit_more_work() -> None:
    chain: list[int] = []
    finished = threading.Event()

    with Pool(Square(), procs=2) as pool:

        def follow(future: Future) -> None:
            value = future.result().value
            chain.append(value)
            if len(chain) < 5:
                pool.submit(len(chain) + 1).add_done_callback(follow)
            else:
                finished.set()

        pool.submit(1).add_done_callback(follow)
        assert finished.wait(30), chain
    assert chain == [1, 4, 9, 16, 25]


def test_cancelled_futures_do_not_block_close() -> None:
    pool = Pool(Sleep(0.05), procs=1)
    futures = [pool.submit(i) for i in range(10)]
    cancelled = [f for f in futures[5:] if f.cancel()]
    pool.close()
    assert all(f.done() for f in futures)
    assert all(f.result().ok for f in futures if not f.cancelled())
    assert all(f.cancelled() for f in cancelled)


def test_many_tiny_jobs_are_fast() -> None:
    # Batching: 20,000 no-op jobs should take well under a second; allow a loaded machine 15 s.
    with Pool(Square(), procs=2) as pool:
        results = pool.map(range(20_000))
        metrics = pool.metrics()
    assert [r.value for r in results[:5]] == [0, 1, 4, 9, 16]
    assert all(r.ok for r in results)
    assert metrics.elapsed < 15


@pytest.mark.timeout(30)
def test_jobs_unpacked_behind_a_long_one_are_stolen_by_an_idle_worker() -> None:
    # chunksize 4: the first batch, the long job and three no-ops, is unpacked in its worker's
    # mailbox while the long job runs (the other worker is busy 0.3 s first, time enough);
    # the other worker, once idle, gets the three through STEAL instead of waiting 3 s.
    with Pool(SleepPid(), procs=2, chunksize=4) as pool:
        pool.map([0.2, 0.2])  # both workers started and ready
        results = pool.map([3.0, 0, 0, 0, 0.3, 0, 0, 0])
    assert all(r.ok and r.attempts == 1 for r in results)
    long_pid = results[0].value
    assert long_pid not in {r.value for r in results[1:4]}, [r.value for r in results]


def test_many_small_rounds_never_stall() -> None:
    # Thousands of short rounds exercise the interleavings of dispatch, prefetch and work
    # stealing between two workers. A pool that strands queued jobs shows up as a stalled
    # round; one that stops feeding a worker shows up at the end, when two long jobs must run
    # side by side on both workers.
    with Pool(SleepPid(), procs=2) as pool:
        for round_no in range(4000):
            futures = [pool.submit(0) for _ in range(5)]
            _, not_done = wait(futures, timeout=10)
            assert not not_done, f"round {round_no} stalled: {pool.metrics()}"
            assert all(f.result().ok for f in futures)
        results = pool.map([0.5, 0.5])
        assert results[0].value != results[1].value, pool.metrics()


# -- a server's lazy submits (sizing.Tuning.lazy_submits) -----------------------------------------


@pytest.mark.timeout(60)
def test_a_lazy_submit_is_taken_while_the_only_worker_never_reports() -> None:
    """With a server's tuning, a submit made while every worker holds jobs does not wake the
    supervisor: the workers' next report would. Here the one worker hangs and will never
    report; the loop still takes the job (it sleeps a bounded time while it relies on
    reports): the job is counted as submitted, and ending the pool ends both."""
    pool = Pool._for_stages([Hang()], 1, tuning=SERVING)
    try:
        stuck = pool.submit("hang")
        wait_for(lambda: pool.metrics().in_flight == 1, 30, "the worker to take the hang")
        waiting = pool.submit("x")
        wait_for(lambda: pool.metrics().submitted == 2, 5, "the supervisor to take the submit")
    finally:
        pool.terminate()
    assert stuck.cancelled() and waiting.cancelled()


@pytest.mark.timeout(60)
def test_lazy_submits_from_threads_all_finish_on_busy_workers() -> None:
    """Many submits, from several threads, while both workers are busy: each one either wakes
    the supervisor or is taken at a pass the workers' reports bring; none is stranded."""
    with Pool._for_stages([Square(delay=0.002)], 2, tuning=SERVING) as pool:
        futures: list[Future[JobResult]] = []
        lock = threading.Lock()

        def submit_many(start: int) -> None:
            for n in range(start, start + 150):
                future = pool.submit(n)
                with lock:
                    futures.append(future)

        threads = [threading.Thread(target=submit_many, args=(k * 150,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        done, not_done = wait(futures, timeout=30)
        assert not not_done
        assert sorted(f.result().value for f in done) == [n * n for n in range(600)]


def test_waiting_for_the_pool_in_its_own_callback_fails_at_once() -> None:
    """Done-callbacks run in the supervisor's thread: a result() there of another job of the
    pool waited for a pass of the loop it was holding up (forever, without a timeout). Every
    such wait now fails at once; a submit() there still works."""
    seen: dict[str, Any] = {}
    called = threading.Event()

    def callback(_: Future[JobResult]) -> None:
        inner = pool.submit(3)
        waits = {
            "result": lambda: inner.result(timeout=5),
            "exception": lambda: inner.exception(timeout=5),
            "map": lambda: pool.map([1]),
            "imap": lambda: pool.imap([1]),
        }
        for name, wait_for_it in waits.items():
            try:
                wait_for_it()
                seen[name] = "waited"
            except Exception as exc:
                seen[name] = f"{type(exc).__name__}: {exc}"
        seen["inner"] = inner
        called.set()

    with Pool(Square(), 2) as pool:
        pool.submit(2).add_done_callback(callback)
        assert called.wait(30)
        assert seen.pop("inner").result(timeout=30).value == 9  # submitted there, and run
        assert pool.map([4])[0].value == 16  # the loop was never held up
    for name, outcome in seen.items():
        assert outcome.startswith("RuntimeError: ") and "would wait forever" in outcome, name


@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
def test_imap_of_a_source_that_raises_runs_what_it_read_then_raises(ordered: bool) -> None:
    """As the builtin map(): every item read before the error is a job whose result comes
    out, then the error. It once surfaced at the read, losing the chunk being read and every
    result still in flight."""

    def source() -> Iterator[int]:
        yield from range(2500)  # more than one chunk of the reader
        raise ValueError("the source broke")

    got: list[JobResult] = []
    with Pool(Square(), 2) as pool:
        with pytest.raises(ValueError, match="the source broke"):
            for r in pool.imap(source(), ordered=ordered):
                got.append(r)
        m = pool.metrics()
    indexes = [r.index for r in got]
    assert (indexes if ordered else sorted(indexes)) == list(range(2500))
    assert all(r.ok and r.value == r.index**2 for r in got)
    assert m.submitted == m.succeeded == 2500


@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
def test_leaving_an_imap_early_cancels_its_jobs_not_started(ordered: bool) -> None:
    """A loop that breaks out of imap() reads no more results: the jobs read ahead that have
    not started are cancelled, as concurrent.futures' map() does, so close() need not wait
    for them (400 jobs of 50 ms on two workers: 10 s); running attempts finish."""
    with Pool(Sleep(0.05), 2) as pool:
        stream = pool.imap(range(400), ordered=ordered)
        first = [next(stream) for _ in range(3)]
        stream.close()  # what leaving a for loop does, once the iterator is dropped
        other = pool.map(range(4))  # the pool serves on
        wait_for(lambda: pool.metrics().queued == 0, 30, "the imap's jobs to be cancelled")
        m = pool.metrics()
    assert all(r.ok for r in first) and [r.value for r in other] == list(range(4))
    assert m.submitted == 404 and m.succeeded + m.cancelled == 404
    assert m.cancelled >= 350, m  # all but what ran before the close reached the pool


# A map() of 10 s of jobs, interrupted by a Ctrl-C after 0.5 s and caught (a notebook's
# interrupt): then the pool serves on. Prints its metrics.
INTERRUPTED_MAP = """
import json, os, signal, sys, threading, time

from batchpool import Pool
from faults import Sleep

if __name__ == "__main__":
    with Pool(Sleep(0.05), 2) as pool:
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            pool.map(range(400))
            sys.exit("the map ended before the interrupt")
        except KeyboardInterrupt:
            pass
        deadline = time.monotonic() + 30
        while pool.metrics().queued and time.monotonic() < deadline:
            time.sleep(0.02)
        other = [r.value for r in pool.map(range(4))]
        m = pool.metrics()
    print(json.dumps([m.submitted, m.succeeded, m.cancelled, other]))
"""


def test_a_map_left_by_an_exception_cancels_its_jobs_not_started(tmp_path: Path) -> None:
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED_MAP)
    r = run([sys.executable, script], cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    submitted, succeeded, cancelled, other = json.loads(r.stdout.splitlines()[-1])
    assert other == list(range(4)) and submitted == 404 and succeeded + cancelled == 404
    assert cancelled >= 350, (succeeded, cancelled)  # not the 10 s of jobs left to run
