"""What every worker does, whatever carries its messages: start, run batches, retire, stop.

The local worker process (worker.py: a pipe, a mailbox thread, shared progress slots) and the
Ray actor (backends/ray.py: one call per message) both drive this module, so a job fails, is
charged, and a worker retires the same way on either backend. Nothing here knows pipes,
threads or Ray: messages leave through a ``send`` callable, jobs arrive as an iterable.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from .messages import (
    ERROR,
    FATAL,
    FLUSHING,
    IDLE,
    OK,
    READY,
    RESULTS,
    SPLIT,
    START_FAILED,
    UNPACKING,
    UNPICKLABLE,
    Hello,
    OutOfBand,
    ProgressSlots,
    Results,
    Runs,
    dumps,
    dumps_out_of_band,
    error_tuple,
    loads,
    progress_slot,
    run_ids,
    run_jobs,
)
from .rates import Gate
from .task import Task, is_retryable

EXIT_START_FAILED = 3  # a worker's exit code when task unpickling or setup() raised
MEMORY_CHECK_EVERY = 0.05  # seconds: psutil RSS costs ~10 us, too much after every no-op job

Job = tuple[int, int, Any]  # (job id, stage, payload)


def start(
    tasks_blob: bytes,
    preload: Sequence[tuple[str, str]],
    prepare: Callable[[], None] | None = None,
) -> tuple[list[Task] | None, Hello]:
    """Import the pipeline files, unpickle the tasks and run their ``setup()``.

    Returns the tasks and the message for the supervisor, READY; or None and START_FAILED
    with what raised, as plain data (its class need not import in the supervisor).
    ``prepare`` runs first, under the same catch (the Ray actor extends sys.path there).
    """
    try:
        if prepare is not None:
            prepare()
        import_files(preload)
        tasks: list[Task] = loads(tasks_blob)
        for task in tasks:
            task.setup()
    except BaseException as exc:
        return None, (START_FAILED, error_tuple(exc))
    return tasks, (READY, os.getpid())


def stop(tasks: Sequence[Task]) -> None:
    """Run every task's ``teardown()``. A failure is printed, not raised: the worker leaves
    anyway, and the other tasks' teardown still runs."""
    for task in tasks:
        try:
            task.teardown()
        except Exception as exc:
            print(f"batchpool worker {os.getpid()}: teardown failed: {exc!r}", file=sys.stderr)


def import_files(preload: Sequence[tuple[str, str]]) -> None:
    """Import pipeline files by path under the module names the supervisor gave them, so task
    classes defined there unpickle under spawn, forkserver and on Ray."""
    for name, path in preload:
        if getattr(sys.modules.get(name), "__file__", None) == path:
            continue  # imported by the parent (fork) or by the forkserver (preload.py)
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


class _Memory(Protocol):
    @property
    def rss(self) -> int: ...


class Retirement:
    """When a worker leaves on its own, asked after every job it answers: once it has answered
    ``max_tasks`` jobs, or once its RSS is above ``max_memory``.

    The supervisor sends a worker no more than ``max_tasks`` jobs, so the count must include
    every answered job (a refused one too), or the worker would wait for one that never comes.
    RSS is sampled at most every MEMORY_CHECK_EVERY seconds; with no limit, only every
    ``report_every`` seconds where a backend reports it (``rss``), else never.
    """

    __slots__ = ("left", "max_memory", "reason", "rss", "_every", "_sample_at", "_memory_info")

    def __init__(
        self, max_tasks: int | None, max_memory: int | None, report_every: float | None = None
    ) -> None:
        self.left: float = math.inf if max_tasks is None else max_tasks
        self.max_memory = max_memory
        self.reason: str | None = None  # why the worker leaves, once it does
        self.rss: int | None = None  # the latest sample, in bytes
        self._every = MEMORY_CHECK_EVERY if max_memory is not None else report_every
        self._sample_at = 0.0 if self._every is not None else math.inf
        self._memory_info: Callable[[], _Memory] | None = None

    @property
    def counts_jobs(self) -> bool:
        """Whether after_job() can ever retire the worker or sample its memory."""
        return self.left != math.inf or self._sample_at != math.inf

    def after_job(self, now: float) -> str | None:
        """Count one answered job (``now``: time.monotonic()); why the worker leaves, if it
        does."""
        self.left -= 1
        if self.left <= 0:
            self.reason = "max_tasks_per_worker"
        elif now >= self._sample_at:
            rss = self.sample(now)
            if self.max_memory is not None and rss is not None and rss > self.max_memory:
                self.reason = "max_memory"
        return self.reason

    def sample(self, now: float) -> int | None:
        """This process's RSS now (None where psutil cannot tell)."""
        self._sample_at = now + (self._every or 0.0)
        try:
            if self._memory_info is None:
                import psutil  # only workers that sample pay for the import

                self._memory_info = psutil.Process().memory_info
            self.rss = self._memory_info().rss
        except Exception:
            self.rss = None
        return self.rss


class Runner:
    """Runs one worker's jobs batch by batch and reports them through ``send`` as RESULTS
    messages, with the job semantics of messages.py: exceptions as plain data, retryable
    decided here against the real exception, a value that does not pickle charged to its own
    job, a batch whose payloads do not unpickle split.

    ``progress`` and ``slot``: where the job in progress is written for the supervisor's crash
    and timeout attribution (messages.progress_slot); a backend without shared memory leaves
    the default, a list nobody reads. ``flush_every``: seconds after which a long batch sends
    the results it has so far. ``gates``: per rate-limited stage, where its jobs take their
    start (rates.Gate), right before the progress slot names them.

    ``flush_finished()`` may be called from another thread while a batch runs (the local
    worker's mailbox thread, for FLUSH): it sends the results that wait in ``out``. The loop
    takes no lock per job for it: a row's ``values`` column is appended last, so the first
    ``len(values)`` rows are complete, and ``out.sent`` says how many are gone; both senders
    take ``lock`` once per message, and send under it, so results leave in the order of jobs.
    """

    __slots__ = (
        "tasks",
        "send",
        "retirement",
        "progress",
        "job_at",
        "started_at",
        "flush_every",
        "gates",
        "out",
        "lock",
        "out_of_band",
    )

    def __init__(
        self,
        tasks: list[Task],
        send: Callable[[Results], None],
        retirement: Retirement,
        progress: ProgressSlots | None = None,
        slot: int = 0,
        flush_every: float = math.inf,
        gates: dict[int, Gate] | None = None,
        *,
        out_of_band: bool = False,
    ) -> None:
        self.tasks = tasks
        self.send = send
        self.retirement = retirement
        self.progress: ProgressSlots = [IDLE, 0] if progress is None else progress
        self.job_at, self.started_at = progress_slot(slot)
        self.flush_every = flush_every
        self.gates = gates or {}
        self.out = _Results()  # the batch's results not sent yet
        self.lock = threading.Lock()
        # values' big buffers left out of their pickle (messages.results_frame): where
        # ``send`` writes them to a pipe as they are; a Ray call carries one blob
        self.out_of_band = out_of_band

    def unpack(
        self, runs: Runs, blob: bytes | bytearray, buffers: Sequence[bytes | bytearray] = ()
    ) -> list[Job]:
        """The jobs of a RUN message; none when its payloads do not unpickle: a lone job is
        then answered UNPICKLABLE (and counts for retirement), a batch is answered SPLIT, and
        the supervisor reruns its jobs one at a time to find the culprit."""
        progress, job_at = self.progress, self.job_at
        lone = len(runs) == 1 and len(runs[0][0]) == 1
        # A crash or hang while unpickling a lone payload is charged to its job.
        progress[self.started_at] = time.monotonic_ns()
        progress[job_at] = runs[0][0][0] if lone else UNPACKING
        try:
            payloads = loads(blob, buffers=buffers)
        except BaseException as exc:
            progress[job_at] = IDLE
            ids = run_ids(runs)
            n = len(ids)
            if lone:
                retiring = self.retirement.after_job(time.monotonic())
                self.send((RESULTS, ids, [UNPICKLABLE], [0.0], dumps([error_tuple(exc)]), retiring))
            else:
                self.send((RESULTS, ids, [SPLIT] * n, [0.0] * n, dumps([None] * n), None))
            return []
        progress[job_at] = IDLE
        return run_jobs(runs, payloads)

    def run_batch(self, jobs: deque[Job]) -> str | None:
        """Run the jobs of ``jobs``, taken from its left, until none is left or the worker
        retires, and send their results: at the end, at once after a failure, and every
        ``flush_every`` seconds. Returns why the worker retires, None while it stays.

        Another thread may take jobs from the right of ``jobs`` meanwhile (a STEAL): a deque's
        pops are atomic, so each job is either run here or handed back, never both, and no lock
        is taken per job. The loop is the floor of a no-op job's price: one clock per job (a
        job starts when the one before it ended), two slot writes, three appends."""
        retirement = self.retirement
        if retirement.reason:  # retired already (by a refused job): run nothing more
            return retirement.reason
        runs = [task.run for task in self.tasks]
        progress, gates = self.progress, self.gates
        job_at, started_at = self.job_at, self.started_at
        counted = retirement.counts_jobs  # else after_job() is a no-op: skip it per job
        clock = time.monotonic_ns
        take = jobs.popleft
        out = self.out = _Results()
        add_id, add_elapsed, add_value = out.appenders()
        flush_ns = self.flush_every * 1e9
        start = flushed = clock()
        while True:
            try:
                job_id, stage, payload = take()
            except IndexError:
                break
            if gates and (gate := gates.get(stage)) is not None:
                progress[job_at] = IDLE  # waiting at the gate is no part of any attempt
                gate.wait()
                start = clock()
            progress[started_at] = start
            progress[job_at] = job_id
            try:
                value = runs[stage](payload)
            except BaseException as exc:
                end = clock()
                retryable = is_retryable(self.tasks[stage], exc)
                out.fail(ERROR if retryable else FATAL)
                value = error_tuple(exc)
                failed = True
            else:
                end = clock()
                failed = False
            add_id(job_id)
            add_elapsed((end - start) / 1e9)
            add_value(value)  # last: the row is complete (see flush_finished)
            start = end
            if counted:  # an RSS sample (psutil's first import: ~20 ms) is no job's time
                progress[job_at] = IDLE
                if retirement.after_job(end / 1e9):
                    break
                start = clock()
            # A failure is reported at once: its backoff starts now, and a crash of a later
            # job of the batch cannot lose the record of this attempt.
            if failed or end - flushed > flush_ns:
                self._flush(out)
                out = self.out = _Results()
                add_id, add_elapsed, add_value = out.appenders()
                start = flushed = clock()
        if out.ids:
            self._flush(out)
        else:
            progress[job_at] = IDLE
        return retirement.reason

    def flush_finished(self) -> None:
        """From another thread: send the results of the jobs that have ended and are not sent
        yet (if any), whatever the loop is doing meanwhile."""
        with self.lock:
            out = self.out
            end = len(out.values)  # complete rows: values go in last
            if end > out.sent:
                self.send(out.rows(end).message(None, self.out_of_band))

    def _flush(self, out: _Results) -> None:
        """Send the results not sent yet, and why the worker retires if it does; the slot
        says FLUSHING, so a death or hang in pickling is attributed."""
        progress = self.progress
        progress[self.started_at] = time.monotonic_ns()
        progress[self.job_at] = FLUSHING
        reason = self.retirement.reason
        with self.lock:
            part = out.rows(len(out.values)) if out.sent else out
            out.sent = len(out.values)
            if part.ids or reason:
                self.send(part.message(reason, self.out_of_band))
        progress[self.job_at] = IDLE


class _Results:
    """Results of one message, pickled together; an unpicklable value fails its job alone.
    Outcomes are OK but for the rows in ``failures`` (a failure ends a message, so there are
    few): no column is appended per job for them."""

    __slots__ = ("ids", "elapsed", "values", "failures", "sent")

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.elapsed: list[float] = []
        self.values: list[Any] = []
        self.failures: dict[int, int] = {}  # row -> outcome, for the rows that are not OK
        self.sent = 0  # rows sent already (Runner.flush_finished)

    def fail(self, outcome: int) -> None:
        """The row being added (before its value goes in) failed with ``outcome``."""
        self.failures[len(self.values)] = outcome

    def rows(self, end: int) -> _Results:
        """A copy of the rows not sent yet, up to ``end``, from now on sent. A copy: the
        running batch may append to these lists meanwhile."""
        part = _Results()
        start, self.sent = self.sent, end
        part.ids = self.ids[start:end]
        part.elapsed = self.elapsed[start:end]
        part.values = self.values[start:end]
        part.failures = {
            row - start: outcome
            for row, outcome in list(self.failures.items())
            if start <= row < end
        }
        return part

    def appenders(
        self,
    ) -> tuple[Callable[[int], None], Callable[[float], None], Callable[[Any], None]]:
        """One append per column, bound once per message rather than looked up per job."""
        return self.ids.append, self.elapsed.append, self.values.append

    def message(self, retiring: str | None, out_of_band: bool = False) -> Results:
        outcomes = [OK] * len(self.ids)
        for row, outcome in self.failures.items():
            outcomes[row] = outcome
        pickled: Callable[[list[Any]], bytes | OutOfBand] = (
            dumps_out_of_band if out_of_band else dumps
        )
        try:
            blob = pickled(self.values)
        except BaseException:
            for i, value in enumerate(self.values):
                try:
                    dumps(value)
                except BaseException as exc:
                    outcomes[i] = UNPICKLABLE
                    self.values[i] = error_tuple(exc)
            blob = pickled(self.values)
        return (RESULTS, self.ids, outcomes, self.elapsed, blob, retiring)
