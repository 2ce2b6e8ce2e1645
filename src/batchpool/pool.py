"""The public Pool: checks its settings (settings.py), posts commands to its supervisor, hands
back results."""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, wait
from typing import Any

from .backends import Backend, WorkerSpec, make_backend
from .cancelling import Deadline
from .durations import seconds_setting
from .errors import PoolBroken, PoolClosed
from .futures import Collector, Futures, JobFuture, broken_message, refuse_to_wait_in_callback
from .hosting import Host
from .jobs import Block
from .results import JobResult, Metrics
from .settings import IDLE_TIMEOUT, Settings, check_settings, describe
from .sizing import BATCHES, Tuning
from .streaming import SUBMIT_CHUNK, Stream, window
from .supervisor import Supervisor
from .task import UNSET, Task, check_priority

ANSWER_POLL = 0.5  # seconds between looks at a supervisor that may have ended, while waiting


def _supervisor(settings: Settings, workers: Backend, tuning: Tuning) -> Supervisor:
    bounds = settings.bounds
    return Supervisor(
        settings.policies,
        procs=bounds.low,
        bounds=bounds if settings.scaling else None,
        backend=workers,
        # a backend that cannot tell which job of a batch runs fixes the batch size (Ray: 1)
        chunksize=getattr(workers, "chunksize", None) or settings.chunksize,
        max_tasks=settings.max_tasks,
        start_timeout=settings.start_limit,
        batch_seconds=tuning.batch_seconds,
        lazy_submits=tuning.lazy_submits,
    )


def _deadline(deadline: float | None) -> Deadline | None:
    """The tag of a call's blocks; its clock starts now."""
    if deadline is None:
        return None
    return Deadline(seconds_setting("deadline", deadline), time.monotonic())


class Pool:
    """A supervised pool of worker processes running one Task.

    Failed jobs come back as JobResults, never as exceptions; see the SPEC for retries,
    timeouts, crash recovery and shutdown semantics.
    """

    def __init__(
        self,
        task: Task,
        procs: int | tuple[int, int] | None = None,
        *,
        start_method: str | None = None,
        chunksize: int | str = "auto",
        max_tasks_per_worker: int | None = None,
        max_memory: int | None = None,
        retries: int | None = UNSET,
        timeout: float | None = UNSET,
        backoff: float | None = UNSET,
        rate_limit: str | float | None = None,
        start_timeout: float | None = None,
        backend: str = "local",
        address: str | None = None,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        """``procs``: workers (default: the CPU count), or ``(min, max)``: start ``min`` and
        scale with the backlog (scaling.py), an idle worker retiring after ``idle_timeout``
        seconds. ``retries``/``timeout``/``backoff``/``rate_limit`` override the task's
        (``timeout=None`` removes its timeout); ``start_timeout``: seconds a worker gets to
        start and run ``setup()`` before it is killed and counted as a failed start (default:
        60, or the task's timeout if longer)."""
        self._open(
            [task],
            procs,
            start_method=start_method,
            chunksize=chunksize,
            max_tasks_per_worker=max_tasks_per_worker,
            max_memory=max_memory,
            overrides={
                "retries": retries,
                "timeout": timeout,
                "backoff": backoff,
                "rate_limit": rate_limit,
            },
            preload=(),
            start_timeout=start_timeout,
            backend=backend,
            address=address,
            idle_timeout=idle_timeout,
        )

    @classmethod
    def _for_stages(
        cls,
        tasks: Sequence[Task],
        procs: int | tuple[int, int] | None = None,
        *,
        preload: Sequence[tuple[str, str]] = (),
        retries: int | None = UNSET,
        timeout: float | None = UNSET,
        backoff: float | None = UNSET,
        rate_limit: str | float | None = None,
        **options: Any,
    ) -> Pool:
        """A pool whose jobs pass through ``tasks`` in turn (Pipeline's engine);
        ``rate_limit`` overrides every stage's, each stage keeping a limit of its own."""
        pool = cls.__new__(cls)
        overrides = {
            "retries": retries,
            "timeout": timeout,
            "backoff": backoff,
            "rate_limit": rate_limit,
        }
        pool._open(
            list(tasks), procs, overrides=overrides, preload=preload, own_signals=True, **options
        )
        return pool

    def _open(
        self,
        tasks: list[Task],
        procs: int | tuple[int, int] | None,
        *,
        overrides: dict[str, Any],
        preload: Sequence[tuple[str, str]],
        own_signals: bool = False,
        tuning: Tuning = BATCHES,
        hosted: bool = False,
        **options: Any,
    ) -> None:
        """``options``: the settings of Pool() (settings.check_settings); ``tuning``: a
        server's (serve/command.py): latency and CPU priority. ``hosted``: the supervisor
        waits for ``self._host.attach(loop)`` (hosting.py) instead of starting a thread."""
        self._closed = True  # until fully built, so __del__ ignores a half-built pool
        self._owner = os.getpid()
        settings = self._settings = check_settings(tasks, procs, overrides, **options)
        self.procs = settings.bounds.high  # the most workers it may have at once
        self.start_method = settings.start_method
        rates = tuple(p.rate for p in settings.policies)
        spec = WorkerSpec(
            settings.tasks_blob,
            tuple(preload),
            settings.max_tasks,
            settings.max_memory,
            own_signals,
            rates,
            tuning,
        )
        workers = make_backend(
            settings.backend, self.start_method, self.procs, spec, settings.address
        )
        self._supervisor = _supervisor(settings, workers, tuning)
        self._futures = Futures()
        self._submits = itertools.count()  # JobResult.index of submit()ted jobs
        self._submit_lock = threading.Lock()
        self._closed = False
        self._host = Host(self._supervisor) if hosted else None
        if self._host is None:
            self._supervisor.start()

    # -- submitting ----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise PoolClosed("the pool is closed")
        if os.getpid() != self._owner:
            raise PoolClosed(
                f"this pool belongs to process {self._owner}; a forked child cannot use it"
            )
        broken = self._supervisor.broken
        if broken is not None:
            raise PoolBroken(broken_message(broken))

    def _make_job(
        self, index: int, payload: Any, consumer: Any, tag: Any = None, priority: int | None = None
    ) -> Block:
        """A one-job block; ``priority`` None: the first stage's task's."""
        level = self._settings.policies[0].priority if priority is None else priority
        return Block(range(index, index + 1), [payload], consumer, tag, level)

    def _priority(self, priority: int | None) -> int:
        """The jobs' priority: the one asked for (checked), else the task's."""
        return self._settings.policies[0].priority if priority is None else check_priority(priority)

    def _post_jobs(self, entries: list[Block], deadline: Deadline | None = None) -> None:
        """Hand jobs to the supervisor. A pool that broke meanwhile fails them as results (the
        callers checked for a broken pool on entry), so a map() never half-raises."""
        command = ("submit", entries) if deadline is None else ("submit_until", entries, deadline)
        with self._submit_lock:
            if self._closed:
                raise PoolClosed("the pool is closed")
            if not self._supervisor.post(command, urgent=False):
                self._check_open()  # the loop has ended: broken, or closed under us
                raise PoolClosed("the pool has stopped")

    def submit(self, payload: Any, *, priority: int | None = None) -> JobFuture:
        """Queue one job; the Future resolves to its JobResult (failures included).
        ``priority``: higher runs first (default: the task's ``priority``)."""
        level = self._priority(priority)
        self._check_open()
        future = JobFuture()
        job = self._make_job(next(self._submits), payload, self._futures, future, level)
        future._job = job
        future._supervisor = self._supervisor
        self._post_jobs([job])
        return future

    def map(
        self,
        payloads: Iterable[Any],
        *,
        priority: int | None = None,
        deadline: float | None = None,
    ) -> list[JobResult]:
        """Run every payload; results in input order. ``priority``: as for submit().

        ``deadline``: seconds from this call. Then jobs not started are cancelled and running
        attempts are stopped (their workers killed and replaced): every job that has not
        finished comes back as a "cancelled" result, the finished ones as they are."""
        refuse_to_wait_in_callback(self._supervisor, "map()")
        level = self._priority(priority)
        tag = _deadline(deadline)
        self._check_open()
        items = list(payloads)
        results: list[JobResult | None] = [None] * len(items)
        collector = Collector(self._supervisor)
        remaining = len(items)
        try:
            for start in range(0, len(items), SUBMIT_CHUNK):
                stop = min(start + SUBMIT_CHUNK, len(items))
                block = Block(range(start, stop), items[start:stop], collector, tag, level)
                self._post_jobs([block], tag)
            while remaining:
                for indexes, run in collector.take(remaining):
                    if isinstance(indexes, range):  # a map's block, or a part of one
                        results[indexes.start : indexes.stop] = run
                    else:
                        for result in run:
                            results[result.index] = result
                    remaining -= len(run)
        finally:
            if tag is not None:
                self._supervisor.post(("deadline_off", tag))
            if remaining:  # left by an exception (a Ctrl-C in a notebook): nobody will read
                self._abandon(collector)
        return results  # type: ignore[return-value]

    def imap(
        self,
        payloads: Iterable[Any],
        ordered: bool = True,
        *,
        priority: int | None = None,
        deadline: float | None = None,
    ) -> Iterator[JobResult]:
        """Stream results while reading ``payloads`` lazily, a bounded window ahead.
        ``priority``: as for submit().

        ``deadline``: seconds from this call, as for map(); at the deadline the reading of
        ``payloads`` stops too (items not read by then are not jobs: no result stands for
        them), and the stream ends with the results of the jobs submitted."""
        refuse_to_wait_in_callback(self._supervisor, "imap()")
        level = self._priority(priority)
        tag = _deadline(deadline)
        self._check_open()
        collector = Collector(self._supervisor)
        reader = Stream(
            iter(payloads),
            lambda block: self._post_jobs([block], tag),
            self._window,
            collector,
            tag,
            level,
            lambda: self._abandon(collector),
        )
        stream = reader.ordered() if ordered else reader.unordered()
        return stream if tag is None else self._until(stream, tag)

    def _abandon(self, collector: Collector) -> None:
        """A map() or imap() left early: its jobs not started are cancelled
        (Cancels.abandon)."""
        if os.getpid() == self._owner:  # not a forked child's copy of the stream
            self._supervisor.post(("abandon", collector))

    def _window(self) -> int:
        """How many jobs imap() and a pipeline's run keep in flight (streaming.window)."""
        return window(self._supervisor.sizer, self.procs)

    def _until(self, stream: Iterator[JobResult], tag: Deadline) -> Iterator[JobResult]:
        """An imap() stream with a deadline; its timer goes when the stream does."""
        try:
            yield from stream
        finally:
            self._supervisor.post(("deadline_off", tag))

    # -- cancelling ----------------------------------------------------------------------
    def cancel_pending(self) -> int:
        """Cancel every job not started yet: queued, waiting for a retry, or prefetched by a
        worker (taken back first); running attempts finish. Returns how many it cancelled.
        Their futures are cancelled; map() and imap() return them as results with
        ``error.kind == "cancelled"``.

        Called from a future's callback (the pool's own thread), it cannot wait for workers to
        hand back what they prefetched: those jobs are cancelled too, but the count is of the
        jobs cancelled at once."""
        supervisor = self._supervisor
        reply: Future[int] = Future()
        if threading.current_thread() is supervisor.thread:
            return supervisor.cancels.cancel_pending(reply).count
        if os.getpid() != self._owner or not supervisor.post(("cancel_pending", reply)):
            return 0  # a forked child's copy, or a pool that has stopped: nothing pending
        while not wait([reply], timeout=ANSWER_POLL).done:
            if supervisor.done.is_set() and not reply.done():
                return 0  # the loop ended without a word (it answers every caller it saw)
        return reply.result()

    # -- inspecting ----------------------------------------------------------------------
    def metrics(self) -> Metrics:
        return self._supervisor.snapshot()

    def pids(self) -> list[int]:
        """Pids of the live workers (not of Ray actors waiting for room in the cluster)."""
        return self._supervisor.pids()

    def _describe(self) -> str:
        """Its settings, in one line (the log file's run start)."""
        return describe(self._settings, self.procs)

    # -- steering ------------------------------------------------------------------------
    def resize(self, n: int) -> None:
        """Have ``n`` workers now: new ones start at once; the surplus retires, idle ones now
        and busy ones after their current job (their queued jobs go back, uncharged).

        A pool of ``procs=N`` keeps ``n`` from then on. A scaling pool ``procs=(min, max)``
        takes ``n`` within its bounds (ValueError outside them: ``max`` is the most the
        machine was promised, ``min`` what the pool keeps warm) and goes on scaling from
        there: idle workers still retire down to ``min``."""
        self._check_open()
        b = self._settings.bounds
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"resize needs a number of workers >= 1, got {n!r}")
        scaling = self._settings.scaling
        if scaling and not b.low <= n <= b.high:
            raise ValueError(f"resize({n}) is outside this pool's procs=({b.low}, {b.high})")
        if not scaling:
            self.procs = n
        self._supervisor.post(("resize", n))

    # -- ending --------------------------------------------------------------------------
    def close(self) -> None:
        """Stop intake, finish every submitted job, stop the workers with a sentinel each."""
        with self._submit_lock:
            self._closed = True
        self._supervisor.post(("close",))
        self._join()

    def terminate(self) -> None:
        """Kill the workers now; unfinished futures are cancelled."""
        with self._submit_lock:
            self._closed = True
        self._supervisor.post(("terminate",))
        self._join()

    def _join(self) -> None:
        if os.getpid() != self._owner:
            return  # a forked child's copy: its supervisor and workers are the parent's
        if threading.current_thread() is not self._supervisor.thread:
            self._supervisor.done.wait()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.terminate()

    def __del__(self) -> None:
        # A pool dropped without close(): finish its work in the background, never block here.
        if not getattr(self, "_closed", True):
            self._closed = True
            self._supervisor.post(("close",))
