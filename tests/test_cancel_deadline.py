"""Cancellation and deadlines (SPEC 3): the scheduler takes out exactly the jobs cancelled (pure
properties first), then real pools: future.cancel() while queued or waiting for a retry,
cancel_pending() mid-run, map()/imap() with a deadline, and ``batchpool run --deadline``."""

from __future__ import annotations

import itertools
from concurrent.futures import CancelledError
from pathlib import Path

import pytest
from faults import FailTimes, SleepMarked, Square, attempts_of
from helpers import (
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
            for b in s.take(op[1]):
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


# -- batchpool run --deadline ----------------------------------------------------------------------

# Two stages; each appends "STAGE INDEX" to $DL_RUNS and sleeps $DL_SLEEP seconds.
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
        time.sleep(float(os.environ["DL_SLEEP"]))
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
    env = child_env(DL_N=n, DL_SLEEP=0.3, DL_RUNS=runs)  # 16 jobs x 2 stages x 0.3 s: 4.8 s
    run = ["run", pipeline, "--procs", 2, "--no-progress"]
    r = bp(*run, "--deadline", "1.5s", cwd=tmp_path, env=env)
    assert r.returncode == 124, r.stderr
    assert "stopped by deadline" in r.stderr and "Traceback" not in r.stderr
    assert f"continue with: batchpool run {pipeline} --resume" in r.stderr
    recorded = set(final_rows(journal))
    first = read_lines(runs)
    assert 0 < len(recorded) < n
    # Drained, not cut: every job that ran its last stage is in the journal.
    assert _ran(runs, "b", first) == recorded
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
