"""The supervisor: one thread that owns every job and every worker of a pool.

    callers (any thread)         supervisor thread                           workers
    submit / cancel / close / terminate
        --> commands deque + wakeup pipe
                                 loop:
                                   poll(wakeup, channels, pidfds, timeout=next timer)
                                   1. commands   new jobs, cancels, close, terminate
                                   2. messages   READY, START_FAILED, RESULTS  <-- own channel
                                   3. deaths     the running job: crash/timeout attempt;
                                                 jobs it held unstarted: requeued, free
                                   4. timers     retries due; attempt and start deadlines ->
                                                 SIGKILL; stop grace; RSS samples
                                   5. workers    replace the dead and the retired
                                   6. dispatch   batches sized to measured job time -->
                                   7. publish    the counters metrics() reads
                                   8. deliver    final JobResults, to their consumers

Nothing in the loop blocks: channels queue what a worker cannot take yet (channel.py), so a
job stuck in C code holding its worker's GIL cannot stop the timer that kills it. State is
touched only by this thread; other threads read what step 7 publishes, never a half-made
change, and never wait for the loop. Job state changes happen in jobs.JobBook, nowhere else.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import random
import select
import threading
import time
from collections import deque
from typing import Any

from .jobs import Job, JobBook, error_from, result_of
from .messages import (
    ERROR,
    EXITING,
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
    UNPACKING,
    UNPICKLABLE,
    dumps,
    loads,
)
from .processes import block_group_signals, describe_exit
from .results import (
    KIND_CRASH,
    KIND_ERROR,
    KIND_SERIALIZATION,
    KIND_TIMEOUT,
    JobError,
    Metrics,
    StageMetrics,
    WorkerStats,
)
from .sampling import Reservoir
from .task import Policy
from .timers import Timers

log = logging.getLogger("batchpool")
STEAL_MESSAGE = dumps((STEAL,))
STOP_MESSAGE = dumps((STOP,))
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
STOP_GRACE = 10.0  # seconds a stopped worker gets for teardown() before it is killed
RSS_EVERY = 1.0  # seconds between psutil samples of worker memory
EWMA = 0.2  # weight of the newest batch in the job-time estimate
READABLE = select.POLLIN | select.POLLHUP | select.POLLERR | select.POLLNVAL


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
        "polled_write",
    )

    def __init__(self, proc: Any) -> None:
        self.proc = proc
        self.slot = proc.slot
        self.pid = proc.pid
        self.ready = False
        self.outstanding: deque[Job] = deque()  # sent, unanswered; a worker keeps this order
        self.stealing = False  # a STEAL is on its way; no new jobs until a result comes
        self.assigned = 0  # jobs sent and not handed back (max_tasks_per_worker)
        self.jobs = 0
        self.busy = 0.0
        self.rss = 0
        self.retiring = False
        self.stopping = False
        self.killed_for: tuple[Job | None, JobError] | None = None  # a timeout kill
        self.start_error: JobError | None = None  # what START_FAILED reported
        self.polled_write = False  # its channel is watched for room to write


class Supervisor:
    def __init__(
        self,
        policies: list[Policy],
        *,
        procs: int,
        backend: Any,
        chunksize: int | None,
        max_tasks: int | None,
        start_timeout: float,
    ) -> None:
        self.policies = policies
        self.timed = any(p.timeout for p in policies)
        self.procs = procs
        self.backend = backend  # see backends/__init__.py
        self.chunksize = chunksize
        self.max_tasks = max_tasks
        self.start_timeout = start_timeout
        self.book = JobBook(policies, random.random)
        self.timers = Timers()  # ("watch"|"stop"|"start", slot), "rss"
        self.commands: deque[tuple] = deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._wake_pending = False
        self._post_lock = threading.Lock()
        self._ended = False
        self._poll = select.poll()
        self._poll.register(self._wake_r, READABLE)
        self._fds: dict[int, tuple[bool, _Worker]] = {}  # fd -> (is its sentinel, worker)
        self.workers: dict[int, _Worker] = {}  # slot -> worker
        self.job_time: list[float | None] = [None] * len(policies)  # EWMA seconds per job
        self.job_bytes: list[int] = [0] * len(policies)  # pickled payload bytes per job, last seen
        self.samples = [Reservoir() for _ in policies]  # attempt times per stage
        self.closing = False
        self.draining = False  # drop jobs not in a worker's hands (a run being stopped)
        self.terminating = False
        self.broken: JobError | None = None
        self.start_failures = 0
        self.starts = 0
        self.peak_rss = 0
        self.cancelled: list[tuple[Job, JobError | None]] = []
        self.started_at = time.monotonic()
        self.finished_at: float | None = None
        self._view: tuple = ()
        self._publish()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="batchpool-supervisor", daemon=True)

    # -- called from any thread ----------------------------------------------------------------
    def start(self) -> None:
        LIVE.add(self)
        self.thread.start()

    def post(self, command: tuple) -> bool:
        """Queue a command for the loop; False if the loop has ended (nothing will run it).

        The byte is written before the flag is set: an exception (a second Ctrl-C) between
        the two leaves the flag clear, so the next post writes again; the loop clears the
        flag and looks at the commands before it sleeps.
        """
        with self._post_lock:  # the loop closes the pipe under it: no write to a reused fd
            if self._ended:
                return False
            self.commands.append(command)
            if not self._wake_pending:
                try:
                    os.write(self._wake_w, b"!")
                except (BlockingIOError, OSError):
                    pass  # already readable
                self._wake_pending = True
        return True

    def snapshot(self) -> Metrics:
        """What the loop last published: consistent, and never waits for the loop."""
        stages, queued, sent, workers, restarts, peak = self._view
        end = self.finished_at or time.monotonic()
        per_stage = [
            StageMetrics(*counts, sample.quantile(0.5), sample.quantile(0.95))
            for counts, sample in zip(stages, self.samples, strict=True)
        ]
        first, last = per_stage[0], per_stage[-1]
        return Metrics(
            submitted=first.submitted,
            started=sum(s.started for s in per_stage),
            succeeded=last.succeeded,
            failed=sum(s.failed for s in per_stage),
            cancelled=sum(s.cancelled for s in per_stage),
            retried=sum(s.retried for s in per_stage),
            timed_out=sum(s.timed_out for s in per_stage),
            crashed=sum(s.crashed for s in per_stage),
            worker_restarts=restarts,
            queued=queued,
            in_flight=sent,
            workers=len(workers),
            elapsed=end - self.started_at,
            per_worker=tuple(WorkerStats(*w) for w in workers),
            peak_rss=peak,
            stages=tuple(per_stage),
        )

    def pids(self) -> list[int]:
        return [w[0] for w in self._view[3]]

    # -- the loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        block_group_signals()  # inherited by every worker this thread starts
        try:
            self.timers.schedule(time.monotonic() + RSS_EVERY, "rss")
            self._start_workers(time.monotonic())
            self._publish()
            while True:
                events = self._poll.poll(self._timeout())
                finished = self._step(events)
                self._publish()
                self._deliver()
                if finished:
                    break
        except BaseException as exc:
            log.error("the pool's supervisor failed (%r); the pool is broken", exc)
            log.debug("the supervisor's traceback", exc_info=True)
            self._fail_all(exc)
        finally:
            with self._post_lock:
                self._ended = True
                self.finished_at = time.monotonic()
                os.close(self._wake_r)
                os.close(self._wake_w)
            self._settle_late_commands()
            self._publish()
            try:
                self.backend.close()
            finally:
                LIVE.discard(self)
                self.done.set()

    def _timeout(self) -> int | None:
        """Milliseconds until the next timer; 0 when commands wait (see post)."""
        self._wake_pending = False
        if self.commands:
            return 0
        ats = [at for at in (self.timers.next_at(), self.book.queue.next_due()) if at]
        if not ats:
            return None
        return max(0, math.ceil((min(ats) - time.monotonic()) * 1000))

    def _step(self, events: list[tuple[int, int]]) -> bool:
        """One pass of the loop; True when the supervisor is finished."""
        now = time.monotonic()
        exits: list[_Worker] = []
        for fd, mask in events:
            if fd == self._wake_r:
                os.read(self._wake_r, 4096)
                continue
            entry = self._fds.get(fd)
            if entry is None:
                continue
            is_sentinel, w = entry
            if is_sentinel:
                exits.append(w)
                continue
            if mask & select.POLLOUT and not w.proc.channel.flush():
                pass  # it died; its sentinel tells
            if mask & READABLE:
                self._read(w, now)
        self._run_commands(now)
        if self.terminating:
            return True
        for w in exits:
            if w.slot in self.workers:
                self._on_exit(w, now)
        self._fire_timers(now)
        if self.draining:
            self.cancelled.extend((job, None) for job in self.book.abandon())
        if self.broken is not None:  # whatever reaches the queue of a broken pool fails
            self.book.fail_unsent(self.broken)
        self._start_workers(now)
        self._dispatch(now)
        self._watch_writes()
        return self._maybe_stop(now)

    def _run_commands(self, now: float) -> None:
        while self.commands:
            command = self.commands.popleft()
            kind = command[0]
            if kind == "submit":
                self.book.add(command[1])
            elif kind == "cancel":
                self.book.cancel(command[1])
            elif kind == "close":
                self.closing = True
            elif kind == "drain":
                self.draining = True
            elif kind == "terminate":
                self._terminate()
                return

    def _publish(self) -> None:
        book = self.book
        self._view = (
            [stage.counts() for stage in book.stages],
            book.queued,
            book.sent,
            [(w.pid, w.jobs, w.busy, w.rss) for w in self.workers.values()],
            max(0, self.starts - self.procs),
            self.peak_rss,
        )

    # -- messages from workers -----------------------------------------------------------------
    def _read(self, w: _Worker, now: float) -> None:
        try:
            frames = w.proc.channel.receive()
        except EOFError:  # a dying worker's pipe; its sentinel reports the death
            self._unwatch(w.proc.channel.fileno())  # or poll would report it again and again
            return
        for frame in frames:
            try:
                message = loads(frame)
            except BaseException:  # not ours to trust: a frame from a broken writer
                log.debug("unreadable message from worker %s", w.pid, exc_info=True)
                continue
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
            self.timers.cancel(("start", w.slot))
        elif tag == RETURNED:
            self._on_returned(w, set(message[1]))
        elif tag == START_FAILED:
            w.start_error = JobError(KIND_ERROR, *message[1])
        elif tag == EXITING:  # its peak memory: runs shorter than an RSS sample see it too
            self.peak_rss = max(self.peak_rss, message[1])

    def _on_results(
        self, w: _Worker, ids: list, outcomes: list, elapsed: list, blob: bytes, now: float
    ) -> None:
        jobs = self._answered(w, ids)
        if not jobs:
            return
        w.stealing = False
        try:
            values = loads(blob)
        except BaseException as exc:  # a value that pickled in the worker but cannot load here
            self._unloadable([j for j in jobs if j is not None], exc, now)
            return
        book = self.book
        stage = jobs[0].stage if jobs[0] is not None else 0
        if outcomes.count(OK) == len(jobs) and None not in jobs:
            book.complete_all(jobs, values, elapsed)  # the common case, in one pass
        else:
            self._outcomes(w, jobs, outcomes, elapsed, values, now)
        total = sum(elapsed)
        w.jobs += len(jobs)
        w.busy += total
        if outcomes[0] != SPLIT:
            self.samples[stage].extend(elapsed)
            mean = total / len(jobs) + PER_JOB_OVERHEAD
            old = self.job_time[stage]
            self.job_time[stage] = mean if old is None else old + EWMA * (mean - old)

    def _outcomes(
        self,
        w: _Worker,
        jobs: list[Job | None],
        outcomes: list,
        elapsed: list,
        values: list,
        now: float,
    ) -> None:
        book = self.book
        for job, outcome, seconds, value in zip(jobs, outcomes, elapsed, values, strict=True):
            if job is None:
                continue
            if outcome == OK:
                book.complete(job, value, seconds)
            elif outcome == SPLIT:
                w.assigned -= 1  # it never ran there: the worker's quota is not spent
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

    def _unloadable(self, jobs: list[Job], exc: BaseException, now: float) -> None:
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
        self._forget(w)
        code = w.proc.reap()  # dead for sure, its process group swept: nothing runs twice
        running: Job | None = None
        error: JobError | None = None
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
        if running is not None and error is not None:
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

    def _forget(self, w: _Worker) -> None:
        """Stop watching a worker: its descriptors close when it is reaped."""
        del self.workers[w.slot]
        for key in (("watch", w.slot), ("stop", w.slot), ("start", w.slot)):
            self.timers.cancel(key)
        self._unwatch(w.proc.channel.fileno())
        self._unwatch(w.proc.sentinel)

    def _unwatch(self, fd: int) -> None:
        if self._fds.pop(fd, None) is not None:
            self._poll.unregister(fd)

    def _blame(self, w: _Worker, job_id: int) -> Job | None:
        """The job a worker died (or hung) for, or None when it cannot tell.

        Between jobs, while unpickling a batch or while pickling a batch of results, several
        jobs are candidates: each then runs alone, without an attempt charged, so that a job
        that kills its worker is charged on its own; a job alone (or already isolated) is.
        """
        if job_id not in (IDLE, FLUSHING, UNPACKING):
            return _find(w.outstanding, job_id)
        if not w.outstanding:
            return None
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
        self.book.queue.release(now)
        for key, _ in self.timers.pop_due(now):
            if key == "rss":
                for w in self.workers.values():
                    self._sample_rss(w)
                self.timers.schedule(now + RSS_EVERY, "rss")
                continue
            w = self.workers.get(key[1])
            if w is None:
                continue
            if key[0] == "watch":
                self._watch(w, now)
            elif key[0] == "start" and not w.ready:
                message = f"setup() did not finish within {self.start_timeout:g} s; killed"
                log.warning("worker %s: %s", w.pid, message)
                w.start_error = JobError(KIND_ERROR, "StartTimeout", message)
                w.proc.kill()
            elif key[0] == "stop":
                log.warning(
                    "worker %s did not exit within %g s of its stop (a hung teardown() or "
                    "a task's thread?); killed",
                    w.pid,
                    STOP_GRACE,
                )
                w.proc.kill()

    def _sample_rss(self, w: _Worker) -> None:
        rss = w.proc.rss()
        if rss is not None:
            w.rss = rss
            self.peak_rss = max(self.peak_rss, rss)

    def _watch(self, w: _Worker, now: float) -> None:
        """Kill a worker whose running attempt is past its deadline; else look again later."""
        if w.killed_for is not None:
            return
        job_id, started_at = w.proc.running()
        if job_id in (FLUSHING, UNPACKING):  # a hang while (un)pickling counts the first's
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
                log.info("job %s: %s", job.index, message)  # type: ignore[union-attr]
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
    def _start_workers(self, now: float) -> None:
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
            w = _Worker(proc)
            self.workers[slot] = w
            for fd, is_sentinel in ((proc.channel.fileno(), False), (proc.sentinel, True)):
                self._fds[fd] = (is_sentinel, w)
                self._poll.register(fd, READABLE)
            self.timers.schedule(now + self.start_timeout, ("start", slot))

    def _watch_writes(self) -> None:
        """Wake for room in a pipe exactly while frames wait for it."""
        for w in self.workers.values():
            wants = w.proc.channel.wants_write
            fd = w.proc.channel.fileno()
            if wants != w.polled_write and fd in self._fds:  # not at EOF (see _read)
                w.polled_write = wants
                self._poll.modify(fd, READABLE | select.POLLOUT if wants else READABLE)

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
        ready = self.book.queue
        open_workers.sort(key=lambda w: len(w.outstanding))
        for w in open_workers:
            head = ready.head()
            if head is None:
                break
            if w.stealing:
                continue
            stage = head.stage
            size = self._batch_size(stage)
            # Prefetch: the next batch waits in the worker's mailbox, so no round trip idles it
            # between batches; a batch stuck behind a long job is taken back by _steal.
            if len(w.outstanding) > size:
                continue
            n = min(size, -(-len(ready) // len(open_workers)))
            per_job = self.job_bytes[stage]
            if n > 1 and n * per_job < MAX_MESSAGE_BYTES // 2:  # small so far: the next too?
                per_job = max(per_job, _pickled_size(head.data))
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
        if not jobs:
            return  # their futures were cancelled
        try:
            blob = dumps([j.data for j in jobs])
        except BaseException:  # a payload's __reduce__ may raise anything, SystemExit too
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
            except BaseException as exc:
                error = error_from(KIND_SERIALIZATION, exc)
                self.book.attempt_failed(job, error, retryable=False, elapsed=0.0, now=now)
        return good

    # -- ending --------------------------------------------------------------------------------
    def _maybe_stop(self, now: float) -> bool:
        if not self.closing or self.book.unfinished or self.commands:
            return False
        for w in self.workers.values():
            if not w.stopping:
                w.stopping = True
                w.proc.send(STOP_MESSAGE)
                self.timers.schedule(now + STOP_GRACE, ("stop", w.slot))
        return not self.workers

    def _terminate(self) -> None:
        """Kill every worker now; unfinished jobs are cancelled."""
        self.terminating = True
        held = self._kill_all()
        self.book.cancel_held(held)
        held.extend(self.book.abandon())
        self.cancelled.extend((job, None) for job in held)

    def _kill_all(self) -> list[Job]:
        """Kill and reap every worker, whatever state the loop is in; the jobs they held."""
        held: list[Job] = []
        for w in list(self.workers.values()):
            try:
                w.proc.kill()
            except Exception:
                log.exception("could not kill worker %s", w.pid)
        for w in list(self.workers.values()):
            held.extend(w.outstanding)
            w.outstanding.clear()
            try:
                self._forget(w)
                w.proc.reap()
            except Exception:
                log.exception("could not reap worker %s", w.pid)
        self.workers.clear()
        return held

    def _fail_all(self, exc: BaseException) -> None:
        """The loop itself failed: break the pool, kill its workers and fail every job it
        knows of, so that nothing waits on a loop that is gone."""
        self.broken = JobError(
            KIND_ERROR, "SupervisorError", f"the pool's supervisor failed: {exc!r}"
        )
        self.terminating = True
        jobs = self._kill_all()
        jobs.extend(self.book.queue.drain())
        self.book.sent = 0
        try:
            self._deliver()  # results made before the failure
        except BaseException:
            log.exception("delivering results failed")
        self._fail_jobs(jobs)

    def _settle_late_commands(self) -> None:
        """Jobs submitted while the loop was ending: failed if the pool broke, else
        cancelled; never left waiting."""
        jobs = [job for cmd in self.commands if cmd[0] == "submit" for job in cmd[1]]
        self.commands.clear()
        if not jobs:
            return
        self.book.stages[0].submitted += len(jobs)
        if self.broken is not None:
            self._fail_jobs(jobs)
        else:
            self.book.cancel_held(jobs, sent=False)
            self.cancelled.extend((job, None) for job in jobs)
            self._deliver()

    def _fail_jobs(self, jobs: list[Job]) -> None:
        error = self.broken
        for job in jobs:
            try:
                self.book.stages[job.stage].failed += 1
                job.consumer.deliver([(job, result_of(job, None, error, 0.0))])
            except BaseException:
                log.exception("could not fail job %s", job.index)

    def _deliver(self) -> None:
        """Hand final results to their consumers: consumers run user code (future callbacks)
        that may call back into the pool, or raise anything."""
        book = self.book
        done, book.done = book.done, []
        cancelled, self.cancelled = self.cancelled, []
        for job, error in cancelled:
            try:
                job.consumer.cancel(job, error)
            except BaseException:
                log.exception("cancelling job %s failed", job.index)
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
            except BaseException:
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
    except BaseException:
        return 0  # _send reports it as the job's serialization error


def _find(jobs: deque[Job], job_id: int) -> Job | None:
    for job in jobs:
        if job.id == job_id:
            return job
    return None
