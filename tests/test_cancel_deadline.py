"""Cancellation and deadlines (SPEC 3): the scheduler takes out exactly the jobs cancelled (pure
properties first), then real pools: future.cancel() while queued or waiting for a retry,
cancel_pending() mid-run, map()/imap() with a deadline, and ``batchpool run --deadline``."""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import CancelledError
from pathlib import Path

import pytest
from faults import FailTimes, Hang, Sleep, SleepMarked, Square, attempts_of
from helpers import (
    all_gone,
    bp,
    check_invariants,
    child_env,
    final_rows,
    one_line,
    output_rows,
    read_lines,
    wait_for,
    write,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from batchpool import Pipeline, Pool
from batchpool.jobs import Block
from batchpool.scheduler import Scheduler

# -- the scheduler: cancellation removes exactly the jobs named ---------------------------------

SETUPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 4)),
        st.tuples(st.just("take"), st.integers(1, 5)),
        st.tuples(st.just("defer"), st.integers(0, 4), st.floats(0, 10)),
        st.tuples(st.just("release"), st.floats(0, 3)),
    ),
    max_size=40,
)


def _scheduler_in_some_state(ops: list[tuple]) -> tuple[Scheduler, list[Block]]:
    """A scheduler after ``ops`` (one-job blocks: nothing is cut), and the blocks it holds,
    ready or waiting for a retry."""
    s: Scheduler[Block] = Scheduler()
    names = itertools.count()
    held: list[Block] = []
    waiting: list[Block] = []
    now = 0.0
    for op in ops:
        if op[0] == "add":
            s.add([Block([j], [j], None) for j in itertools.islice(names, op[1])])
        elif op[0] == "take":
            for b in s.take(op[1], now):
                b.ids = range(b.payload[0], b.payload[0] + 1)  # as JobBook.take gives ids
                held.append(b)
        elif op[0] == "defer" and held:
            b = held.pop(min(op[1], len(held) - 1))
            s.defer(b, now + op[2])
            if all(b is not w for w in waiting):
                waiting.append(b)
        elif op[0] == "release":
            now += op[1]
            s.release(now)
    ready = list(s)
    inside = ready + [b for b in waiting if all(b is not r for r in ready + held)]
    assert sum(b.size for b in inside) == len(s) + s.waiting
    return s, inside


def _jobs(blocks: list[Block]) -> list[int]:
    return sorted(j for b in blocks for j in b.payload)


@settings(max_examples=300, deadline=None)
@given(SETUPS, st.integers(0, 50))
def test_remove_takes_out_exactly_that_block_ready_or_waiting(ops: list[tuple], pick: int) -> None:
    s, inside = _scheduler_in_some_state(ops)
    before = len(s) + s.waiting
    if not inside:
        return
    target = inside[pick % len(inside)]
    assert s.remove(target)
    assert not s.remove(target), "removed twice"
    assert len(s) + s.waiting == before - target.size
    s.release(1e9)
    rest = s.drain()
    assert all(b is not target for b in rest)
    assert _jobs(rest) == _jobs([b for b in inside if b is not target])


@settings(max_examples=300, deadline=None)
@given(SETUPS, st.integers(2, 4), st.integers(0, 3))
def test_remove_where_takes_out_exactly_the_blocks_named(
    ops: list[tuple], modulus: int, residue: int
) -> None:
    s, inside = _scheduler_in_some_state(ops)
    wanted = lambda b: b.payload[0] % modulus == residue  # noqa: E731
    removed = s.remove_where(wanted)
    assert _jobs(removed) == _jobs([b for b in inside if wanted(b)])
    assert len(s) + s.waiting == sum(b.size for b in inside if not wanted(b))
    assert s.remove_where(wanted) == []
    s.release(1e9)
    assert _jobs(s.drain()) == _jobs([b for b in inside if not wanted(b)])


# -- future.cancel() -------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_queued_future_cancelled_never_runs(tmp_path: Path) -> None:
    with Pool(SleepMarked(tmp_path, 1.0), procs=1) as pool:
        running = pool.submit("slow")
        queued = [pool.submit(f"q{i}") for i in range(4)]
        wait_for(lambda: attempts_of(tmp_path, "slow"), 10, "the slow job to start")
        assert running.running() and not running.cancel()
        assert [f.cancel() for f in queued[2:]] == [True, True]
        with pytest.raises(CancelledError):
            queued[3].result(timeout=1)
        assert [f.result(timeout=10).ok for f in [running, *queued[:2]]] == [True] * 3
    assert not attempts_of(tmp_path, "q2") and not attempts_of(tmp_path, "q3")
    m = pool.metrics()
    assert (m.submitted, m.succeeded, m.cancelled) == (5, 3, 2)
    check_invariants(m)


@pytest.mark.timeout(30)
def test_a_future_waiting_for_its_retry_is_pending_and_can_be_cancelled(tmp_path: Path) -> None:
    # The retry would come after 60 s: the pool closes at once instead, and the job never
    # runs again.
    with Pool(FailTimes(1, tmp_path, retries=3, backoff=60.0), procs=1) as pool:
        future = pool.submit("x")
        wait_for(lambda: pool.metrics().retried == 1, 10, "the first attempt to fail")
        assert not future.running() and not future.done()
        assert future.cancel() and future.cancelled()
        wait_for(lambda: pool.metrics().cancelled == 1, 10, "the cancel to be counted")
        assert pool.metrics().queued == 0
    assert len(attempts_of(tmp_path, "x")) == 1
    m = pool.metrics()
    assert (m.submitted, m.started, m.retried, m.cancelled) == (1, 1, 1, 1)
    check_invariants(m)


# -- cancel_pending() ------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_cancel_pending_mid_run_cancels_all_not_started_and_counts_add_up(tmp_path: Path) -> None:
    with Pool(SleepMarked(tmp_path, 1.5), procs=2) as pool:
        mapped: list = []
        thread = threading.Thread(target=lambda: mapped.extend(pool.map(["m0", "m1", "m2"])))
        futures = [pool.submit(p) for p in ["slow1", "slow2", *(f"q{i}" for i in range(8))]]
        thread.start()
        wait_for(
            lambda: attempts_of(tmp_path, "slow1") and attempts_of(tmp_path, "slow2"),
            10,
            "both slow jobs to run",
        )
        started = {
            p for p in ["m0", "m1", "m2", *(f"q{i}" for i in range(8))] if attempts_of(tmp_path, p)
        }
        assert not started  # both workers are busy: the rest waits, queued or prefetched
        assert pool.cancel_pending() == 11
        assert all(f.cancelled() for f in futures[2:])
        thread.join(10)
        assert [f.result(timeout=10).ok for f in futures[:2]] == [True, True]
    assert [(r.error.kind, r.error.type, r.attempts) for r in mapped] == [
        ("cancelled", "Cancelled", 0)
    ] * 3
    assert not any(attempts_of(tmp_path, f"q{i}") for i in range(8))
    m = pool.metrics()
    assert (m.submitted, m.succeeded, m.failed, m.cancelled) == (13, 2, 0, 11)
    check_invariants(m)


@pytest.mark.timeout(30)
def test_cancel_pending_takes_a_job_waiting_for_its_retry(tmp_path: Path) -> None:
    with Pool(FailTimes(1, tmp_path, retries=3, backoff=60.0), procs=1) as pool:
        future = pool.submit("x")
        wait_for(lambda: pool.metrics().retried == 1, 10, "the first attempt to fail")
        assert pool.cancel_pending() == 1
        assert future.cancelled()
        assert pool.cancel_pending() == 0
    assert len(attempts_of(tmp_path, "x")) == 1
    check_invariants(pool.metrics())


@pytest.mark.timeout(30)
def test_cancel_pending_from_a_done_callback_fails_fast(tmp_path: Path) -> None:
    """The callback runs on the pool's own thread: cancel_pending() cannot wait there for
    workers to hand back what they prefetched; it cancels them all the same."""
    runs = tmp_path / "runs"
    counts: list[int] = []
    with Pool(Square(runs=runs, fail=frozenset({2}), delay=0.1), procs=1) as pool:
        futures = [pool.submit(i) for i in range(12)]
        futures[2].add_done_callback(lambda _: counts.append(pool.cancel_pending()))
        wait_for(lambda: all(f.done() for f in futures), 20, "every future to be done")
        cancelled = [i for i, f in enumerate(futures) if f.cancelled()]
        assert len(counts) == 1 and 1 <= counts[0] <= len(cancelled) and len(cancelled) >= 8
        assert futures[2].result().error.type == "PermanentError"
        assert all(f.result().ok for i, f in enumerate(futures) if i != 2 and i not in cancelled)
    assert not {int(n) for n in read_lines(runs)} & set(cancelled)
    assert pool.cancel_pending() == 0  # closed: nothing pending
    m = pool.metrics()
    assert m.cancelled == len(cancelled) and m.failed == 1
    check_invariants(m)


# -- deadlines ------------------------------------------------------------------------------------

SLOW_LAST = ["a", "b", "c", "d", "e", "slow1", "slow2"]  # slow*: 5 s on the first attempt


def _check_partial(tmp_path: Path, results: list, payloads: list[str]) -> set[int]:
    """The slow jobs "cancelled", the rest ok, each with the attempts it made; the pids of the
    workers that ran the cut attempts."""
    assert [r.payload for r in results] == payloads
    for r in results:
        assert r.attempts == len(attempts_of(tmp_path, r.payload)), r
        if r.payload.startswith("slow"):
            assert (r.error.kind, r.error.type) == ("cancelled", "Cancelled"), r
            assert "deadline" in r.error.message
        else:
            assert r.ok and r.value == r.payload, r
    return {r.worker for r in results if r.payload.startswith("slow") and r.attempts}


@pytest.mark.timeout(30)
def test_map_deadline_returns_partial_results_and_replaces_the_stopped_workers(
    tmp_path: Path,
) -> None:
    with Pool(SleepMarked(tmp_path, 5.0), procs=2) as pool:
        assert all(r.ok for r in pool.map(["warm1", "warm2"]))
        began = time.monotonic()
        results = pool.map(SLOW_LAST, deadline=1.5)
        took = time.monotonic() - began
        assert 1.5 <= took < 4, took
        killed = _check_partial(tmp_path, results, SLOW_LAST)
        assert killed, "no running attempt was stopped"
        wait_for(lambda: all_gone(killed), 10, "the stopped workers to be gone")
        assert [r.value for r in pool.map(["after1", "after2"])] == ["after1", "after2"]
        wait_for(lambda: len(pool.pids()) == 2, 10, "two workers again")
        assert not set(pool.pids()) & killed
        m = pool.metrics()
    assert m.cancelled == 2 and m.worker_restarts >= len(killed)
    check_invariants(m, cut_short=True)


@pytest.mark.timeout(30)
def test_a_deadline_keeps_the_results_a_stopped_worker_had_not_sent_yet(tmp_path: Path) -> None:
    # Timed fast jobs: the next call travels in one batch, and a worker sends its results every
    # 0.25 s or at the end of the batch. At the deadline, a..e have ended but their results wait
    # in the worker, which runs slow1: they must come back as they are.
    payloads = ["a", "b", "c", "d", "e", "slow1", "f", "g"]
    with Pool(SleepMarked(tmp_path, 5.0), procs=1) as pool:
        assert all(r.ok for r in pool.map([f"warm{i}" for i in range(8)]))
        (pid,) = pool.pids()
        results = pool.map(payloads, deadline=1.0)
        assert all(r.worker == pid for r in results if r.attempts), "not one batch"
        assert [(r.payload, r.ok, r.value, r.attempts) for r in results[:5]] == [
            (p, True, p, 1) for p in payloads[:5]
        ]
        cut = [(r.payload, r.error.kind, r.attempts) for r in results[5:]]
        assert cut == [("slow1", "cancelled", 1), ("f", "cancelled", 0), ("g", "cancelled", 0)]
        assert not attempts_of(tmp_path, "f") and not attempts_of(tmp_path, "g")
        wait_for(lambda: all_gone({pid}), 10, "the stopped worker to be gone")
        assert [r.value for r in pool.map(["after"])] == ["after"]
        m = pool.metrics()
    assert (m.succeeded, m.cancelled) == (14, 3)
    check_invariants(m, cut_short=True)


@pytest.mark.timeout(30)
def test_a_deadline_stops_a_worker_that_cannot_answer_flush() -> None:
    # The job holds the GIL: the worker's reader thread cannot answer FLUSH, and the grace
    # timer kills the worker all the same.
    with Pool(Hang(retries=0), procs=1) as pool:
        a, gil = pool.map(["a", "gil"], deadline=0.5)
        assert (a.ok, a.value, gil.error.kind, gil.attempts) == (True, "a", "cancelled", 1)
        pid = gil.worker
        wait_for(lambda: all_gone({pid}), 10, "the stopped worker to be gone")
        assert [r.value for r in pool.map(["b"])] == ["b"]


@pytest.mark.timeout(30)
def test_imap_deadline_is_kept_while_the_caller_does_not_read(tmp_path: Path) -> None:
    with Pool(SleepMarked(tmp_path, 5.0), procs=2) as pool:
        began = time.monotonic()
        stream = pool.imap(SLOW_LAST, deadline=1.0)
        first = next(stream)
        # The caller reads nothing more: the supervisor cancels at the deadline all the same.
        wait_for(lambda: pool.metrics().cancelled == 2, 4, "the deadline to cancel the slow jobs")
        assert time.monotonic() - began >= 1.0
        results = [first, *stream]
        _check_partial(tmp_path, results, SLOW_LAST)
        assert [r.value for r in pool.imap(["after"], ordered=False)] == ["after"]


@pytest.mark.timeout(30)
def test_imap_deadline_stops_reading_an_endless_source() -> None:
    with Pool(Sleep(0.01), procs=2) as pool:
        results = list(pool.imap(itertools.count(), ordered=False, deadline=1.0))
    assert results and all(r.ok or r.error.kind == "cancelled" for r in results)
    assert sorted(r.index for r in results) == list(range(len(results)))


@pytest.mark.parametrize("bad", [0, -1, True, "1s", float("inf"), float("nan")])
def test_a_deadline_must_be_seconds_above_zero(bad: object) -> None:
    with Pool(Square(), procs=1) as pool:
        with pytest.raises(ValueError, match="deadline must be a number of seconds > 0"):
            pool.map([1], deadline=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="deadline must be a number of seconds > 0"):
            pool.imap([1], deadline=bad)  # type: ignore[arg-type]
        assert pool.map([3], deadline=30)[0].value == 9


# -- batchpool run --deadline ----------------------------------------------------------------------

# Two stages, "a" and "b"; each appends "STAGE INDEX" to $DL_RUNS, then sleeps $DL_SLEEP_<STAGE>
# seconds.
TWO_STAGES_PY = """
import os
import time

from faults import append_line

from batchpool import Pipeline, Task

N = int(os.environ["DL_N"])


class Stage(Task):
    retries = 0

    def __init__(self, name):
        self.name = name

    def run(self, item):
        n, value = item
        append_line(os.environ["DL_RUNS"], f"{self.name} {n}")
        time.sleep(float(os.environ.get(f"DL_SLEEP_{self.name.upper()}", "0")))
        return n, value + 1


pipeline = Pipeline([(n, n) for n in range(N)], Stage("a"), Stage("b"), name="two")
"""


def _ran(runs: Path, stage: str, lines: list[str]) -> set[int]:
    return {int(line.split()[1]) for line in lines if line.split()[0] == stage}


@pytest.mark.timeout(60)
def test_cli_deadline_drains_exits_124_and_resume_completes_exactly_once(tmp_path: Path) -> None:
    n, runs = 16, tmp_path / "runs"
    pipeline = write(tmp_path / "two.py", TWO_STAGES_PY)
    journal = tmp_path / ".batchpool" / "two.sqlite"
    # 16 jobs of 0.55 s on 2 workers: 4.4 s of work; at the deadline the workers are most
    # likely inside a stage "b" attempt, which the drain lets finish.
    env = child_env(DL_N=n, DL_SLEEP_A=0.05, DL_SLEEP_B=0.5, DL_RUNS=runs)
    run = ["run", pipeline, "--procs", 2, "--no-progress"]
    r = bp(*run, "--deadline", "2.5s", cwd=tmp_path, env=env)
    assert r.returncode == 124, r.stderr
    assert "stopped by deadline" in r.stderr and "Traceback" not in r.stderr
    assert f"continue with: batchpool run {pipeline} --resume" in r.stderr
    recorded = set(final_rows(journal))
    first = read_lines(runs)
    assert 0 < len(recorded) < n
    # Drained, not cut: every job that started its last stage is in the journal.
    assert _ran(runs, "b", first) == recorded
    env = child_env(DL_N=n, DL_RUNS=runs)
    r = bp(*run, "--resume", "--output", "out.jsonl", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    rows = output_rows(tmp_path / "out.jsonl", n)
    assert all(x["ok"] and x["value"] == [x["index"], x["index"] + 2] for x in rows)
    again = _ran(runs, "b", read_lines(runs)[len(first) :])
    assert not again & recorded and again | recorded == set(range(n))


@pytest.mark.parametrize("value", ["soon", "-5", "0", "1.5 hours"])
def test_cli_refuses_a_bad_deadline_with_one_line_exit_2(tmp_path: Path, value: str) -> None:
    pipeline = write(tmp_path / "two.py", TWO_STAGES_PY)
    runs = tmp_path / "runs"
    r = bp("run", pipeline, "--deadline", value, cwd=tmp_path, env=child_env(DL_N=2, DL_RUNS=runs))
    assert r.returncode == 2, r.stderr
    assert "--deadline" in one_line(r.stderr)
    assert not runs.exists() and not (tmp_path / ".batchpool").exists()


def test_pipeline_run_refuses_a_bad_deadline_before_anything_starts(tmp_path: Path) -> None:
    for bad in (0, -1.0, True, "30m", float("nan")):
        with pytest.raises(ValueError, match="deadline must be a number of seconds > 0"):
            Pipeline([1], Square()).run(journal=None, progress=False, deadline=bad)
