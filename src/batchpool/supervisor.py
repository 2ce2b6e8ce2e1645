"""The supervisor: one thread that owns every job and every worker of a pool.

    callers (any thread)         supervisor thread                           workers
    submit / close / terminate
        --> commands deque + wakeup pipe
                                 loop:
                                   wait(wakeup, pipes, sentinels, timeout=next timer)
                                   1. commands   new jobs, close, terminate
                                   2. messages   READY, START_FAILED, RESULTS  <-- own pipe
                                   3. deaths     the running job: crash/timeout attempt;
                                                 jobs it held unstarted: requeued, free
                                   4. timers     retries due; attempt deadlines -> SIGKILL
                                   5. workers    replace the dead and the retired
                                   6. dispatch   batches sized to measured job time -->
                                   7. deliver    final JobResults, outside the lock

All state below is touched only by this thread, under ``lock`` so that ``snapshot()`` from any
other thread sees it whole. Job state changes happen in jobs.JobBook, nowhere else.
"""

from __future__ import annotations

import atexit
import logging
import os
import random
import threading
import time
from collections import deque
from multiprocessing.connection import wait
from typing import Any

from .jobs import Job, JobBook, error_from
from .messages import (
    ERROR,
    FLUSHING,
    IDLE,
    OK,
    READY,
    RESULTS,
    RETURNED,
    RUN,
    SPLIT,
    START_FAILED,
    STEAL,
    STOP,
    UNPICKLABLE,
    dumps,
    loads,
)
from .processes import describe_exit
from .results import (
    KIND_CRASH,
    KIND_ERROR,
    KIND_SERIALIZATION,
    KIND_TIMEOUT,
    JobError,
    Metrics,
    WorkerStats,
)
from .task import Policy
from .timers import Timers

log = logging.getLogger("batchpool")
STEAL_MESSAGE = dumps((STEAL,))
LIVE: set[Supervisor] = set()  # running supervisors, strongly held: a dropped Pool's included


@atexit.register
def _terminate_at_exit() -> None:
    """A pool still open at interpreter exit is terminated: exit never waits on a worker."""
    for supervisor in list(LIVE):
        supervisor.post(("terminate",))
    for supervisor in list(LIVE):
        supervisor.done.wait(10)


MAX_START_FAILURES = 3  # consecutive failed worker starts before the pool gives up
TARGET_BATCH_SECONDS = 0.01  # work per message: per-message costs stay well under 1%
MAX_BATCH = 512  # jobs per message, however tiny they are
PER_JOB_OVERHEAD = 5e-6  # seconds a worker spends per job besides run(): (un)pickling
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # payload bytes per message, unless one job is bigger
STOP_GRACE = 30.0  # seconds a stopped worker gets for teardown() before it is killed
RSS_EVERY = 1.0  # seconds between psutil samples of worker memory
EWMA = 0.2  # weight of the newest batch in the job-time estimate


class _Worker:
    """The supervisor's view of one worker process."""

    __slots__ = (
        "proc",
        "slot",
        "pid",
        "ready",
        "outstanding",
        "stealing",
        "assigned",
        "jobs",
        "busy",
        "rss",
        "retiring",
        "stopping",
        "killed_for",
        "start_error",
    )

    def __init__(self, proc: Any) -> None:
        self.proc = proc
        self.slot = proc.slot
        self.pid = proc.pid
        self.ready = False
        self.outstanding: deque[Job] = deque()  # sent, unanswered; a worker keeps this order
        self.stealing = False  # a STEAL is on its way; no new jobs until a result comes
        self.assigned = 0  # jobs ever sent (max_tasks_per_worker)
        self.jobs = 0
        self.busy = 0.0
        self.rss = 0
        self.retiring = False
        self.stopping = False
        self.killed_for: tuple[Job, JobError] | None = None  # a timeout kill
        self.start_error: JobError | None = None  # what START_FAILED reported


class Supervisor:
    def __init__(
        self,
        policies: list[Policy],
        *,
        procs: int,
        backend: Any,
        chunksize: int | None,
        max_tasks: int | None,
    ) -> None:
        self.policies = policies
        self.timed = any(p.timeout for p in policies)
        self.procs = procs
        self.backend = backend  # see backends/__init__.py
        self.chunksize = chunksize
        self.max_tasks = max_tasks
        self.lock = threading.RLock()
        self.book = JobBook(policies, random.random)
        self.timers = Timers()  # ("watch", slot), ("stop", slot), "rss"
        self.commands: deque[tuple] = deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._wake_pending = False
        self._post_lock = threading.Lock()
        self.workers: dict[int, _Worker] = {}  # slot -> worker
        self.job_time: list[float | None] = [None] * len(policies)  # EWMA seconds per job
        self.job_bytes: list[int] = [0] * len(policies)  # pickled payload bytes per job, last seen
        self.closing = False
        self.draining = False  # drop jobs not in a worker's hands (a run being stopped)
        self.terminating = False
        self.broken: JobError | None = None
        self.start_failures = 0
        self.last_start_error: JobError | None = None
        self.starts = 0
        self.cancelled: list[tuple[Job, JobError | None]] = []
        self.started_at = time.monotonic()
        self.finished_at: float | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="batchpool-supervisor", daemon=True)

    # -- called from any thread ----------------------------------------------------------------
    def start(self) -> None:
        LIVE.add(self)
        self.thread.start()

    def post(self, command: tuple) -> None:
        self.commands.append(command)
        if not self._wake_pending:
            self._wake_pending = True
            with self._post_lock:
                if self._wake_w < 0:
                    return  # the loop has ended (its fd number may belong to a file now)
                try:
                    os.write(self._wake_w, b"!")
                except (BlockingIOError, OSError):
                    pass  # already readable

    def snapshot(self) -> Metrics:
        with self.lock:
            book = self.book
            end = self.finished_at or time.monotonic()
            return Metrics(
                submitted=book.submitted,
                started=book.started,
                succeeded=book.succeeded,
                failed=book.failed,
                retried=book.retried,
                timed_out=book.timed_out,
                crashed=book.crashed,
                worker_restarts=max(0, self.starts - self.procs),
                queued=len(book.ready) + len(book.retry_timers),
                in_flight=book.sent,
                workers=len(self.workers),
                elapsed=end - self.started_at,
                per_worker=tuple(
                    WorkerStats(w.pid, w.jobs, w.busy, w.rss) for w in self.workers.values()
                ),
            )

    def pids(self) -> list[int]:
        with self.lock:
            return [w.pid for w in self.workers.values()]

    # -- the loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with self.lock:
                self.timers.schedule(time.monotonic() + RSS_EVERY, "rss")
                self._start_workers()
            while True:
                ready = wait(self._waitables(), self._timeout())
                with self.lock:
                    finished = self._step(ready)
                self._deliver()
                if finished:
                    break
        except BaseException:
            log.exception("batchpool supervisor failed; terminating the pool")
            with self.lock:
                self._terminate(JobError(KIND_ERROR, "SupervisorError", "supervisor failed"))
            self._deliver()
        finally:
            with self.lock:
                self.finished_at = time.monotonic()
            with self._post_lock:
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_r = self._wake_w = -1
            self.backend.close()
            LIVE.discard(self)
            self.done.set()

    def _waitables(self) -> list:
        items: list[Any] = [self._wake_r]
        for w in self.workers.values():
            items.append(w.proc.conn)
            items.append(w.proc.sentinel)
        return items

    def _timeout(self) -> float | None:
        with self.lock:
            ats = [at for at in (self.timers.next_at(), self.book.retry_timers.next_at()) if at]
        if not ats:
            return None
        return max(0.0, min(ats) - time.monotonic())

    def _step(self, ready: list) -> bool:
        """One pass of the loop; True when the supervisor is finished."""
        now = time.monotonic()
        if self._wake_r in ready:
            # Drain, then clear: a post() between the two finds the flag set and does not
            # write, and its command is run just below. The other order loses that wakeup.
            os.read(self._wake_r, 4096)
            self._wake_pending = False
        self._run_commands(now)
        if self.terminating:
            return True
        by_conn = {w.proc.conn: w for w in self.workers.values()}
        by_sentinel = {w.proc.sentinel: w for w in self.workers.values()}
        for item in ready:
            if item in by_conn:
                self._read(by_conn[item], now)
        for item in ready:
            if item in by_sentinel:
                self._on_exit(by_sentinel[item], now)
        self._fire_timers(now)
        if self.draining:
            self.cancelled.extend((job, None) for job in self.book.abandon())
        self._start_workers()
        self._dispatch(now)
        return self._maybe_stop()

    def _run_commands(self, now: float) -> None:
        while self.commands:
            command = self.commands.popleft()
            kind = command[0]
            if kind == "submit":
                self.book.add(command[1])
                if self.broken is not None:
                    self.book.fail_unsent(self.broken)
            elif kind == "close":
                self.closing = True
            elif kind == "drain":
                self.draining = True
            elif kind == "terminate":
                self._terminate(None)
                return

    # -- messages from workers -----------------------------------------------------------------
    def _read(self, w: _Worker, now: float) -> None:
        conn = w.proc.conn
        while True:
            try:
                if not conn.poll():
                    return
                message = loads(conn.recv_bytes())
            except (EOFError, OSError):
                return  # a dying worker's pipe; its sentinel reports the death
            except Exception:  # a message cut short by a kill mid-write
                log.debug("unreadable message from worker %s", w.pid, exc_info=True)
                return
            self._on_message(w, message, now)

    def _on_message(self, w: _Worker, message: tuple, now: float) -> None:
        tag = message[0]
        if tag == RESULTS:
            _, ids, outcomes, elapsed, blob, retiring = message
            self._on_results(w, ids, outcomes, elapsed, blob, now)
            if retiring:
                log.debug("worker %s retires (%s)", w.pid, retiring)
                w.retiring = True
                self._requeue_held(w)
        elif tag == READY:
            w.ready = True
            self.start_failures = 0
        elif tag == RETURNED:
            self._on_returned(w, set(message[1]))
        elif tag == START_FAILED:
            w.start_error = JobError(KIND_ERROR, *message[1])

    def _on_results(
        self, w: _Worker, ids: list, outcomes: list, elapsed: list, blob: bytes, now: float
    ) -> None:
        jobs = self._answered(w, ids)
        if not jobs:
            return
        w.stealing = False
        try:
            values = loads(blob)
        except Exception as exc:  # a value that pickled in the worker but cannot load here
            self._unloadable([j for j in jobs if j is not None], exc, now)
            return
        book = self.book
        stage = jobs[0].stage if jobs[0] is not None else 0
        if outcomes.count(OK) == len(jobs) and None not in jobs:
            book.complete_all(jobs, values, elapsed)  # the common case, in one pass
        else:
            self._outcomes(jobs, outcomes, elapsed, values, now)
        total = sum(elapsed)
        w.jobs += len(jobs)
        w.busy += total
        if outcomes[0] != SPLIT:
            mean = total / len(jobs) + PER_JOB_OVERHEAD
            old = self.job_time[stage]
            self.job_time[stage] = mean if old is None else old + EWMA * (mean - old)

    def _outcomes(
        self, jobs: list[Job | None], outcomes: list, elapsed: list, values: list, now: float
    ) -> None:
        book = self.book
        for job, outcome, seconds, value in zip(jobs, outcomes, elapsed, values, strict=True):
            if job is None:
                continue
            if outcome == OK:
                book.complete(job, value, seconds)
            elif outcome == SPLIT:
                book.requeue([job], solo=True)
            else:
                kind = KIND_SERIALIZATION if outcome == UNPICKLABLE else KIND_ERROR
                retryable = outcome == ERROR
                error = JobError(kind, *value)
                book.attempt_failed(job, error, retryable=retryable, elapsed=seconds, now=now)

    def _answered(self, w: _Worker, ids: list) -> list[Job | None]:
        """Take the answered jobs off the worker, which answers in the order it was sent;
        None for an id it no longer holds (charged to a timeout kill already)."""
        outstanding = w.outstanding
        front = _take_front(outstanding, ids)
        if front is not None:
            return front  # type: ignore[return-value]
        jobs: list[Job | None] = []
        for job_id in ids:
            if outstanding and outstanding[0].id == job_id:
                jobs.append(outstanding.popleft())
            else:
                job = _find(outstanding, job_id)
                if job is not None:
                    outstanding.remove(job)
                jobs.append(job)
        return jobs

    def _on_returned(self, w: _Worker, ids: set[int]) -> None:
        """Jobs handed back by a STEAL: to the front of the queue, free, for idle workers."""
        returned = [job for job in w.outstanding if job.id in ids]
        for job in returned:
            w.outstanding.remove(job)
        w.assigned -= len(returned)
        self.book.requeue(returned)
        if not w.outstanding:
            w.stealing = False  # it gave back everything: no result will come to clear it

    def _unloadable(self, jobs: list[Job], exc: Exception, now: float) -> None:
        if len(jobs) == 1:
            error = error_from(KIND_SERIALIZATION, exc)
            self.book.attempt_failed(jobs[0], error, retryable=False, elapsed=0.0, now=now)
        else:  # which value? run each alone to find out; no attempt charged
            self.book.requeue(jobs, solo=True)

    def _requeue_held(self, w: _Worker) -> None:
        self.book.requeue(list(w.outstanding))
        w.outstanding.clear()

    # -- deaths --------------------------------------------------------------------------------
    def _on_exit(self, w: _Worker, now: float) -> None:
        self._read(w, now)  # results it sent before dying still count
        job_id, started_at = w.proc.running()
        code = w.proc.reap()
        del self.workers[w.slot]
        self.timers.cancel(("watch", w.slot))
        self.timers.cancel(("stop", w.slot))
        running: Job | None = None
        if w.killed_for is not None:
            running, error = w.killed_for
            if running not in w.outstanding:
                running = None  # its result made it out before the kill
        elif w.outstanding and not w.stopping:
            running = self._blame(w, job_id)
            error = JobError(
                KIND_CRASH,
                "WorkerCrashed",
                f"worker {w.pid} died while running the job: {describe_exit(code)}",
                "",
                code,
            )
        if running is not None:
            w.outstanding.remove(running)
        self._requeue_held(w)
        if running is not None:
            elapsed = max(0.0, now - started_at)
            if error.kind == KIND_CRASH:
                log.info(
                    "job %s: worker %s crashed (%s)", running.index, w.pid, describe_exit(code)
                )
            self.book.attempt_failed(running, error, retryable=True, elapsed=elapsed, now=now)
        if not w.ready and not w.stopping and not self.terminating:
            self._start_failed(
                w.start_error
                or JobError(
                    KIND_ERROR,
                    "WorkerCrashed",
                    f"worker {w.pid} died before it was ready: {describe_exit(code)}",
                    "",
                    code,
                )
            )

    def _blame(self, w: _Worker, job_id: int) -> Job | None:
        """The job a worker died (or hung) for, or None when it cannot tell.

        Between jobs, while unpickling a batch or while pickling a batch of results, several
        jobs are candidates: each then runs alone, without an attempt charged, so that a job
        that kills its worker is charged on its own; a job alone (or already isolated) is.
        """
        if job_id not in (IDLE, FLUSHING):
            return _find(w.outstanding, job_id)
        head = w.outstanding[0]
        if head.solo or (job_id == FLUSHING and len(w.outstanding) == 1):
            return head
        self.book.requeue(list(w.outstanding), solo=True)
        w.outstanding.clear()
        return None

    def _start_failed(self, error: JobError) -> None:
        self.start_failures += 1
        log.warning("worker failed to start: %s: %s", error.type, error.message)
        if self.start_failures >= MAX_START_FAILURES and self.broken is None:
            log.error("workers failed to start %d times in a row; giving up", self.start_failures)
            self.broken = error
            self.book.fail_unsent(error)

    # -- timers --------------------------------------------------------------------------------
    def _fire_timers(self, now: float) -> None:
        self.book.release_due(now)
        for key, _ in self.timers.pop_due(now):
            if key == "rss":
                self._sample_rss()
                self.timers.schedule(now + RSS_EVERY, "rss")
            elif key[0] == "watch":
                self._watch(self.workers.get(key[1]), now)
            elif key[0] == "stop" and key[1] in self.workers:
                self.workers[key[1]].proc.kill()

    def _sample_rss(self) -> None:
        for w in self.workers.values():
            rss = w.proc.rss()
            if rss is not None:
                w.rss = rss

    def _watch(self, w: _Worker | None, now: float) -> None:
        """Kill a worker whose running attempt is past its deadline; else look again later."""
        if w is None or w.killed_for is not None:
            return
        job_id, started_at = w.proc.running()
        if job_id == FLUSHING:  # a hang while pickling results counts against the first
            job = w.outstanding[0] if w.outstanding else None
        else:
            job = _find(w.outstanding, job_id)
        timeout = job is not None and self.policies[job.stage].timeout
        if timeout:
            deadline = started_at + timeout
            if now >= deadline:
                message = f"attempt exceeded its {timeout:g} s timeout; worker {w.pid} killed"
                error = JobError(KIND_TIMEOUT, "TimeoutError", message)
                blamed = self._blame(w, job_id)  # several candidates: each runs alone next
                w.killed_for = (blamed, error)
                log.info("job %s: %s", job.index, message)
                w.proc.kill()
                return
            self.timers.schedule(deadline, ("watch", w.slot))
            return
        self._schedule_watch(w, now)

    def _schedule_watch(self, w: _Worker, now: float) -> None:
        if not self.timed:
            return
        timeouts = [self.policies[j.stage].timeout for j in w.outstanding]
        timeouts = [t for t in timeouts if t]
        if timeouts:
            self.timers.schedule(now + min(timeouts), ("watch", w.slot))

    # -- workers -------------------------------------------------------------------------------
    def _start_workers(self) -> None:
        if self.broken is not None or self.terminating:
            return
        if self.closing and not self.book.unfinished:
            return
        free = [s for s in range(self.procs) if s not in self.workers]
        for slot in free:
            if self.broken is not None:
                return
            self.starts += 1
            try:
                proc = self.backend.start_worker(slot)
            except Exception as exc:
                log.error("could not start a worker: %r", exc)
                self._start_failed(JobError(KIND_ERROR, type(exc).__name__, str(exc)))
                continue
            self.workers[slot] = _Worker(proc)

    # -- dispatch ------------------------------------------------------------------------------
    def _batch_size(self, stage: int) -> int:
        if self.chunksize:
            return self.chunksize
        t = self.job_time[stage]
        if t is None:
            return 1
        return max(1, min(MAX_BATCH, int(TARGET_BATCH_SECONDS / t)))

    def _dispatch(self, now: float) -> None:
        open_workers = [
            w
            for w in self.workers.values()
            if w.ready and not w.retiring and not w.stopping and w.killed_for is None
        ]
        if not open_workers:
            return
        ready = self.book.ready
        open_workers.sort(key=lambda w: len(w.outstanding))
        for w in open_workers:
            if not ready:
                break
            if w.stealing:
                continue
            stage = ready[0].stage
            size = self._batch_size(stage)
            # Prefetch: the next batch waits in the worker's mailbox, so no round trip idles it
            # between batches; a batch stuck behind a long job is taken back by _steal.
            if len(w.outstanding) > size:
                continue
            n = min(size, -(-len(ready) // len(open_workers)))
            per_job = self.job_bytes[stage]
            if n > 1 and n * per_job < MAX_MESSAGE_BYTES // 2:  # small so far: the next too?
                per_job = max(per_job, _pickled_size(ready[0].data))
            if per_job:  # big payloads: several moderate messages pipeline better
                n = min(n, max(1, MAX_MESSAGE_BYTES // per_job))
            if self.max_tasks is not None:
                n = min(n, self.max_tasks - w.assigned)
            if n > 0:
                self._send(w, n, now)
        if not ready:
            self._steal(open_workers)

    def _steal(self, open_workers: list[_Worker]) -> None:
        """An idle worker and nothing queued: take back jobs waiting behind running ones."""
        if not any(not w.outstanding for w in open_workers):
            return
        for w in open_workers:
            if len(w.outstanding) > 1 and not w.stealing:
                w.stealing = True
                w.proc.send(STEAL_MESSAGE)

    def _send(self, w: _Worker, n: int, now: float) -> None:
        jobs = self.book.take(n, w.pid)
        try:
            blob = dumps([j.data for j in jobs])
        except Exception:
            jobs = self._drop_unpicklable(jobs, now)
            if not jobs:
                return
            blob = dumps([j.data for j in jobs])
        per_job = len(blob) // len(jobs) + 1
        self.job_bytes[jobs[0].stage] = per_job
        if len(jobs) > 1 and len(blob) > 2 * MAX_MESSAGE_BYTES:
            # Payloads behind the first grew past the estimate: one giant message would leave
            # the other workers idle while it travels. Send a moderate one; the rest go back
            # to the front of the queue.
            keep = max(1, MAX_MESSAGE_BYTES // per_job)
            self.book.requeue(jobs[keep:])
            jobs = jobs[:keep]
            blob = dumps([j.data for j in jobs])
        header = dumps((RUN, [j.id for j in jobs], [j.stage for j in jobs]))
        if not w.proc.send(header, blob):
            self.book.requeue(jobs)  # it died; its sentinel will tell
            return
        w.outstanding.extend(jobs)
        w.assigned += len(jobs)
        if ("watch", w.slot) not in self.timers:
            self._schedule_watch(w, now)

    def _drop_unpicklable(self, jobs: list[Job], now: float) -> list[Job]:
        """Fail the jobs whose payload cannot be pickled (one attempt, never retried)."""
        good = []
        for job in jobs:
            try:
                dumps(job.data)
                good.append(job)
            except Exception as exc:
                error = error_from(KIND_SERIALIZATION, exc)
                self.book.attempt_failed(job, error, retryable=False, elapsed=0.0, now=now)
        return good

    # -- ending --------------------------------------------------------------------------------
    def _maybe_stop(self) -> bool:
        if not self.closing or self.book.unfinished or self.commands:
            return False
        for w in self.workers.values():
            if not w.stopping:
                w.stopping = True
                w.proc.send(dumps((STOP,)))
                self.timers.schedule(time.monotonic() + STOP_GRACE, ("stop", w.slot))
        return not self.workers

    def _terminate(self, error: JobError | None) -> None:
        """Kill every worker now; unfinished jobs are cancelled (or failed with ``error``)."""
        self.terminating = True
        for w in self.workers.values():
            w.proc.kill()
        held: list[Job] = []
        for w in list(self.workers.values()):
            w.proc.reap()
            held.extend(w.outstanding)
        self.workers.clear()
        self.book.sent = 0
        held.extend(self.book.abandon())
        self.cancelled.extend((job, error) for job in held)

    def _deliver(self) -> None:
        """Hand final results to their consumers outside the lock: consumers run user code
        (future callbacks) that may call back into the pool."""
        with self.lock:
            done, self.book.done = self.book.done, []
            cancelled, self.cancelled = self.cancelled, []
        for job, error in cancelled:
            job.consumer.cancel(job, error)
        if not done:
            return
        by_consumer: dict[Any, list] = {}
        for consumer, run in done:
            items = by_consumer.get(consumer)
            if items is None:
                by_consumer[consumer] = run
            else:
                items.extend(run)
        for consumer, items in by_consumer.items():
            try:
                consumer.deliver(items)
            except Exception:
                log.exception("delivering results failed")


def _take_front(jobs: deque[Job], ids: list[int]) -> list[Job] | None:
    """The first len(ids) jobs, if they are exactly ``ids`` (a whole batch answered in order,
    nothing lost to a timeout kill or a steal): one pass instead of a search per id."""
    k = len(ids)
    if not k or len(jobs) < k or jobs[k - 1].id != ids[-1]:
        return None
    popleft = jobs.popleft
    front = [popleft() for _ in range(k)]
    if [job.id for job in front] == ids:
        return front
    jobs.extendleft(reversed(front))
    return None


def _pickled_size(data: Any) -> int:
    try:
        return len(dumps(data))
    except Exception:
        return 0  # _send reports it as the job's serialization error


def _find(jobs: deque[Job], job_id: int) -> Job | None:
    for job in jobs:
        if job.id == job_id:
            return job
    return None
