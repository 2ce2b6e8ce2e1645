"""The worker core (batchpool.workercore), in this process: the rules the local worker process
and the Ray actor share, checked without processes. Start-up and its failures as data, the job
semantics of a batch (exceptions as data, retryable decided against the real exception, a value
that does not pickle charged to its own job, a batch whose payloads do not unpickle split), the
attribution slot, retirement, teardown. The tests of each backend run the same code for real."""

from __future__ import annotations

import sys
import textwrap
import threading
from collections import deque
from pathlib import Path
from typing import Any

import pytest
from faults import Base, FaultOnUnpickle
from hypothesis import given, settings
from hypothesis import strategies as st
from ray_tasks import RaiseByPayload, ReturnUnpicklable

from batchpool.messages import (
    ERROR,
    FATAL,
    IDLE,
    OK,
    READY,
    RESULTS,
    SPLIT,
    START_FAILED,
    UNPICKLABLE,
    dumps,
    loads,
)
from batchpool.workercore import (
    MEMORY_CHECK_EVERY,
    Retirement,
    Runner,
    import_files,
    start,
    stop,
)

pytestmark = pytest.mark.timeout(60)


def runner(task: Any, max_tasks: int | None = None, **options: Any) -> tuple[Runner, list]:
    sent: list[tuple] = []
    return Runner([task], sent.append, Retirement(max_tasks, None), **options), sent


def decoded(sent: list[tuple]) -> list[tuple]:
    """(ids, outcomes, values, retiring) of each RESULTS message sent."""
    out = []
    for tag, ids, outcomes, elapsed, blob, retiring in sent:
        assert tag == RESULTS and len(elapsed) == len(ids)
        out.append((ids, outcomes, loads(blob), retiring))
    return out


def jobs(payloads: list) -> deque[tuple[int, int, Any]]:
    return deque((i, 0, p) for i, p in enumerate(payloads))


# -- start-up and teardown -----------------------------------------------------------------------


class Marks(Base):
    def __init__(self, log: list, name: str, fail: str = "") -> None:
        self.log, self.name, self.fail = log, name, fail

    def setup(self) -> None:
        if self.fail == "setup":
            raise RuntimeError(f"{self.name} setup boom")

    def teardown(self) -> None:
        self.log.append(self.name)
        if self.fail == "teardown":
            raise RuntimeError(f"{self.name} teardown boom")


def test_start_imports_the_pipeline_files_before_the_tasks_unpickle(tmp_path: Path) -> None:
    path = tmp_path / "stage_file.py"
    path.write_text(
        textwrap.dedent("""
        from batchpool import Task

        class Stage(Task):
            def setup(self):
                self.ready = True

            def run(self, payload):
                return payload
        """)
    )
    name = "bp_test_preloaded_stage"
    import_files([(name, str(path))])
    blob = dumps([sys.modules[name].Stage()])
    del sys.modules[name]  # as in a fresh worker: only the preload can make it importable
    tasks, hello = start(blob, [(name, str(path))])
    try:
        assert hello[0] == READY
        assert tasks is not None and tasks[0].ready
        assert type(tasks[0]).__module__ == name
    finally:
        sys.modules.pop(name, None)


def test_start_failures_come_back_as_data() -> None:
    tasks, hello = start(dumps([Marks([], "first", fail="setup")]), [])
    assert tasks is None
    tag, (type_name, message, traceback_text) = hello
    assert (tag, type_name, message) == (START_FAILED, "RuntimeError", "first setup boom")
    assert "in setup" in traceback_text
    tasks, hello = start(b"not a pickle", [])
    assert tasks is None and hello[0] == START_FAILED
    tasks, hello = start(dumps([]), [("bp_missing", "/nonexistent/jobs.py")])
    assert tasks is None and hello[0] == START_FAILED and hello[1][0] == "FileNotFoundError"


def test_stop_prints_a_failed_teardown_and_tears_down_the_rest(
    capsys: pytest.CaptureFixture,
) -> None:
    log: list[str] = []
    stop([Marks(log, "a", fail="teardown"), Marks(log, "b")])
    assert log == ["a", "b"]
    assert "teardown failed: RuntimeError('a teardown boom')" in capsys.readouterr().err


# -- one batch -----------------------------------------------------------------------------------


def test_exceptions_are_data_and_retryable_is_decided_against_the_real_exception() -> None:
    run, sent = runner(RaiseByPayload())
    assert run.run_batch(jobs(["a", "value", "b", "key", "permanent", "c"])) is None
    messages = decoded(sent)
    # a failure is reported at once, with the jobs before it
    assert [m[0] for m in messages] == [[0, 1], [2, 3], [4], [5]]
    outcomes = [o for m in messages for o in m[1]]
    assert outcomes == [OK, ERROR, OK, FATAL, FATAL, OK]
    values = [v for m in messages for v in m[2]]
    assert [values[i][:2] for i in (1, 3, 4)] == [
        ("ValueError", "value refused"),
        ("KeyError", "'key refused'"),
        ("PermanentError", "permanently refused"),
    ]
    assert [values[i] for i in (0, 2, 5)] == ["a", "b", "c"]


def test_a_value_that_does_not_pickle_fails_its_own_job_only() -> None:
    run, sent = runner(ReturnUnpicklable())
    run.run_batch(jobs(["a", "lock", "b", "refuses"]))
    [(ids, outcomes, values, _)] = decoded(sent)
    assert ids == [0, 1, 2, 3]
    assert outcomes == [OK, UNPICKLABLE, OK, UNPICKLABLE]
    assert values[0] == "a" and values[2] == "b"
    assert values[1][0] == "TypeError" and values[3][:2] == ("ValueError", "refuses to be pickled")


def test_payloads_that_do_not_unpickle_split_a_batch_and_charge_a_lone_job() -> None:
    run, sent = runner(ReturnUnpicklable())
    bad = dumps([FaultOnUnpickle("exception"), "fine"])
    assert run.unpack([(range(7, 9), 0)], bad) == []
    assert run.unpack([(range(9, 10), 0)], dumps([FaultOnUnpickle("exception")])) == []
    assert run.unpack([(range(10, 11), 0), (range(11, 12), 1)], dumps(["x", "y"])) == [
        (10, 0, "x"),
        (11, 1, "y"),
    ]
    split, lone = decoded(sent)
    assert split == ([7, 8], [SPLIT, SPLIT], [None, None], None)
    assert lone[:2] == ([9], [UNPICKLABLE]) and lone[2][0][:2] == ("ValueError", "injected fault")


def test_long_batches_send_what_they_have_every_flush_interval() -> None:
    run, sent = runner(ReturnUnpicklable(), flush_every=0.0)
    run.run_batch(jobs(["a", "b", "c"]))
    assert [m[0] for m in decoded(sent)] == [[0], [1], [2]]
    run, sent = runner(ReturnUnpicklable())
    run.run_batch(jobs(["a", "b", "c"]))
    assert [m[0] for m in decoded(sent)] == [[0, 1, 2]]


class ReadsSlot(Base):
    """Returns what the worker's progress slot said while run() ran."""

    def __init__(self, progress: list) -> None:
        self.progress = progress

    def run(self, payload: Any) -> Any:
        return tuple(self.progress)


def test_the_progress_slot_names_the_running_job_and_idle_between() -> None:
    progress = [0, 0, 0, 0]  # two workers' slots; this runner writes slot 1
    run, sent = runner(ReadsSlot(progress), progress=progress, slot=1)
    run.run_batch(deque([(41, 0, None), (42, 0, None)]))
    [(_, _, values, _)] = decoded(sent)
    assert [v[2] for v in values] == [41, 42]
    assert values[1][3] >= values[0][3] > 0  # start times, monotonic ns
    assert progress[2] == IDLE and progress[:2] == [0, 0]


class SlotWhileSampling(Retirement):
    """Notes what the progress slot says each time the worker counts a job (and may sample
    its RSS: psutil's first import alone takes ~20 ms)."""

    def __init__(self, progress: list, job_at: int) -> None:
        super().__init__(None, max_memory=1 << 60)
        self.progress, self.job_at, self.seen = progress, job_at, []

    def after_job(self, now: float) -> str | None:
        self.seen.append(self.progress[self.job_at])
        return super().after_job(now)


def test_the_slot_names_no_job_while_the_worker_samples_its_memory() -> None:
    """A timeout counts from the slot's start time: the RSS sample after a job must not
    count as that job's time."""
    progress = [0, 0]
    retirement = SlotWhileSampling(progress, 0)
    run = Runner([ReadsSlot(progress)], lambda message: None, retirement, progress)
    run.run_batch(deque([(41, 0, None), (42, 0, None), (43, 0, None)]))
    assert retirement.seen == [IDLE, IDLE, IDLE]


# -- retirement ----------------------------------------------------------------------------------


def test_retirement_after_max_tasks_ends_the_batch_with_the_reason() -> None:
    run, sent = runner(ReturnUnpicklable(), max_tasks=2)
    assert run.run_batch(jobs(["a", "b", "c"])) == "max_tasks_per_worker"
    assert decoded(sent) == [([0, 1], [OK, OK], ["a", "b"], "max_tasks_per_worker")]
    assert run.run_batch(jobs(["d"])) == "max_tasks_per_worker"  # runs nothing more
    assert len(sent) == 1


def test_a_refused_lone_job_counts_for_retirement() -> None:
    # The supervisor counts it against max_tasks_per_worker: so must the worker, or it waits.
    run, sent = runner(ReturnUnpicklable(), max_tasks=1)
    assert run.unpack([(range(5, 6), 0)], dumps([FaultOnUnpickle("exception")])) == []
    [(ids, outcomes, _, retiring)] = decoded(sent)
    assert (ids, outcomes, retiring) == ([5], [UNPICKLABLE], "max_tasks_per_worker")
    assert run.run_batch(jobs(["a"])) == "max_tasks_per_worker" and len(sent) == 1


def test_memory_is_sampled_at_most_every_check_interval() -> None:
    assert Retirement(None, max_memory=1).after_job(100.0) == "max_memory"
    roomy = Retirement(None, max_memory=1 << 60)
    assert roomy.after_job(100.0) is None and roomy.rss and roomy.rss > 0
    roomy.rss = None
    assert roomy.after_job(100.0 + MEMORY_CHECK_EVERY / 2) is None
    assert roomy.rss is None  # not sampled again so soon
    roomy.after_job(100.0 + MEMORY_CHECK_EVERY)
    assert roomy.rss and roomy.rss > 0
    unlimited = Retirement(None, None)
    for i in range(3):
        assert unlimited.after_job(100.0 + i) is None
    assert unlimited.rss is None  # no limit, nobody reporting: psutil is never asked
    reported = Retirement(None, None, report_every=1.0)
    assert reported.after_job(100.0) is None and reported.rss and reported.rss > 0


class Mixed(RaiseByPayload):
    """RaiseByPayload, and payload "lock" returns a lock (which pickle refuses)."""

    def run(self, payload: Any) -> Any:
        return threading.Lock() if payload == "lock" else super().run(payload)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(["ok", "value", "permanent", "lock"]), max_size=12),
    st.one_of(st.none(), st.integers(1, 14)),
)
def test_every_job_is_answered_once_in_order_up_to_retirement(
    payloads: list[str], max_tasks: int | None
) -> None:
    run, sent = runner(Mixed(), max_tasks=max_tasks)
    retiring = run.run_batch(jobs(payloads))
    messages = decoded(sent)
    answered = [i for m in messages for i in m[0]]
    n = len(payloads) if max_tasks is None else min(len(payloads), max_tasks)
    assert answered == list(range(n))
    assert retiring == ("max_tasks_per_worker" if n == max_tasks else None)
    assert [m[3] for m in messages] == [None] * (len(messages) - 1) + [retiring] * bool(messages)
    for ids, outcomes, _, _ in messages:
        # a message ends at each failure in run(), or where the batch (or the worker) ends
        assert all(o in (OK, UNPICKLABLE) for o in outcomes[:-1])
        assert len(ids) == len(outcomes)


# -- FLUSH: another thread sends the results not sent yet, mid-batch ------------------------------


class FlushesFirst(RaiseByPayload):
    """Payload "flush" calls ``runner.flush_finished()`` before it returns, as the local
    worker's reader thread does when FLUSH arrives while a job runs."""

    runner: Runner

    def run(self, payload: Any) -> Any:
        if payload == "flush":
            self.runner.flush_finished()
        return super().run(payload)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(["ok", "permanent", "flush"]), max_size=12),
    st.one_of(st.none(), st.integers(1, 14)),
)
def test_a_flush_mid_batch_sends_the_jobs_that_ended_once_in_order(
    payloads: list[str], max_tasks: int | None
) -> None:
    task = FlushesFirst()
    run, sent = runner(task, max_tasks=max_tasks)
    task.runner = run
    retiring = run.run_batch(jobs(payloads))
    n = len(payloads) if max_tasks is None else min(len(payloads), max_tasks)
    expected: list[list[int]] = []  # a flush sends what ended before it, a failure itself
    pending: list[int] = []
    for i, payload in enumerate(payloads[:n]):
        if payload == "flush" and pending:
            expected.append(pending)
            pending = []
        pending.append(i)
        if payload == "permanent":
            expected.append(pending)
            pending = []
    expected += [pending] if pending else []
    messages = decoded(sent)
    assert [m[0] for m in messages] == expected
    for ids, outcomes, values, _ in messages:
        assert outcomes == [FATAL if payloads[i] == "permanent" else OK for i in ids]
        rows = zip(ids, outcomes, values, strict=True)
        assert all(value == payloads[i] for i, outcome, value in rows if outcome == OK)
    assert [m[3] for m in messages] == [None] * (len(messages) - 1) + [retiring] * bool(messages)


def test_a_flush_from_another_thread_loses_and_repeats_no_result() -> None:
    """The reader thread flushes in a loop while the batch runs no-op jobs: each job's result
    leaves exactly once, in order, whole (the loop takes no lock per job)."""
    run, sent = runner(RaiseByPayload())
    n = 50_000
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            run.flush_finished()

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # hand the GIL over as often as it goes: many interleavings
    thread = threading.Thread(target=reader)
    thread.start()
    try:
        run.run_batch(jobs([f"v{i}" for i in range(n)]))
    finally:
        done.set()
        thread.join()
        sys.setswitchinterval(switch)
    messages = decoded(sent)
    assert len(messages) > 2, "the reader never sent anything: no interleaving tested"
    assert [i for m in messages for i in m[0]] == list(range(n))
    assert [v for m in messages for v in m[2]] == [f"v{i}" for i in range(n)]
    assert all(o == OK for m in messages for o in m[1])
