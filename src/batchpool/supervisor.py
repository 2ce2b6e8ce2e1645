"""The supervisor: one thread that owns every job and every worker of a pool.

    callers (any thread)         supervisor thread                           workers
    submit / cancel / close / terminate
        --> Commands (wakeup.py)
                                 loop (_step):
                                   Watch.wait    wakeup, channels, pidfds, next timer
                                   1. commands   new jobs, cancels, close, drain, terminate
                                   2. messages   READY, START_FAILED, RESULTS  <-- own channel
                                   3. deaths     the running job: crash/timeout attempt
                                                 (ledger.attribute); the rest requeued, free
                                   4. timers     retries due; attempt and start deadlines ->
                                                 SIGKILL; stop grace; RSS samples
                                   5. workers    replace the dead and the retired
                                   6. dispatch   batches sized by sizing.BatchSizer -->
                                   7. publish    the counters metrics() reads
                                   8. deliver    final JobResults, to their consumers

Where things live: jobs travel in blocks (jobs.Block: a run of jobs that share their way, so
the loop pays per block, not per job); their state changes in jobs.JobBook, their place in
line in scheduler.Scheduler, what a worker holds in ledger.WorkerView. Nothing in the loop blocks:
channels queue what a worker cannot take yet (channel.py), so a job stuck in C code holding its
worker's GIL cannot stop the timer that kills it. State is touched only by this thread; other
threads read what step 7 publishes, never a half-made change, and never wait for the loop.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Sequence
from typing import Any, cast

from .jobs import Block, Counts, Delivery, JobBook, count
from .ledger import WorkerView, attribute, find
from .messages import (
    EXITING,
    FLUSHING,
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
    dumps,
    loads,
)
from .processes import block_group_signals, describe_exit
from .registry import LIVE
from .results import (
    KIND_CRASH,
    KIND_ERROR,
    KIND_TIMEOUT,
    JobError,
    JobResult,
    Metrics,
    StageMetrics,
    WorkerStats,
)
from .sampling import Reservoir
from .sizing import BatchSizer
from .task import Policy
from .timers import Timers
from .wakeup import Commands
from .watch import Watch

log = logging.getLogger("batchpool")
Command = tuple[Any, ...]  # ("submit", blocks), ("cancel", block), ("close",), ("drain",), ...
# what metrics() reads: per-stage counts, queued, sent, (pid, jobs, busy, rss) per worker,
# restarts, peak RSS
View = tuple[list[Counts], int, int, list[tuple[int, int, float, int]], int, int]
STEAL_MESSAGE = dumps((STEAL,))
STOP_MESSAGE = dumps((STOP,))

MAX_START_FAILURES = 3  # consecutive failed worker starts before the pool gives up
STOP_GRACE = 10.0  # seconds a stopped worker gets for teardown() before it is killed
RSS_EVERY = 1.0  # seconds between psutil samples of worker memory


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
        self.max_tasks = max_tasks
        self.start_timeout = start_timeout
        self.book = JobBook(policies, random.random)
        self.sizer = BatchSizer(len(policies), chunksize)
        self.timers = Timers()  # ("watch"|"stop"|"start", slot), "rss"
        self.commands: Commands[Command] = Commands()
        self.watch: Watch[WorkerView] = Watch(self.commands.fileno())
        self.workers: dict[int, WorkerView] = {}  # slot -> worker
        self.samples = [Reservoir() for _ in policies]  # attempt times per stage
        self.closing = False
        self.draining = False  # drop jobs not in a worker's hands (a run being stopped)
        self.terminating = False
        self.broken: JobError | None = None
        self.start_failures = 0
        self.starts = 0
        self.peak_rss = 0
        self.cancelled: list[tuple[Block, JobError | None]] = []
        self.started_at = time.monotonic()
        self.finished_at: float | None = None
        self._view: View
        self._publish()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="batchpool-supervisor", daemon=True)

    # -- called from any thread ----------------------------------------------------------------
    def start(self) -> None:
        LIVE.add(self)
        self.thread.start()

    def post(self, command: Command) -> bool:
        """Queue a command for the loop; False once the loop has ended."""
        return self.commands.post(command)

    def snapshot(self) -> Metrics:
        """What the loop last published: consistent, and never waits for the loop."""
        stages, queued, sent, workers, restarts, peak = self._view
        per_stage = [
            StageMetrics(*counts, sample.quantile(0.5), sample.quantile(0.95))
            for counts, sample in zip(stages, self.samples, strict=True)
        ]
        return Metrics(
            submitted=per_stage[0].submitted,
            started=sum(s.started for s in per_stage),
            succeeded=per_stage[-1].succeeded,
            failed=sum(s.failed for s in per_stage),
            cancelled=sum(s.cancelled for s in per_stage),
            retried=sum(s.retried for s in per_stage),
            timed_out=sum(s.timed_out for s in per_stage),
            crashed=sum(s.crashed for s in per_stage),
            worker_restarts=restarts,
            queued=queued,
            in_flight=sent,
            workers=len(workers),
            elapsed=(self.finished_at or time.monotonic()) - self.started_at,
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
            while True:
                self._publish()
                self._deliver()
                if self._step(*self.watch.wait(self._timeout())):
                    break
            self._publish()
            self._deliver()
        except BaseException as exc:
            log.error("the pool's supervisor failed (%r); the pool is broken", exc)
            log.debug("the supervisor's traceback", exc_info=True)
            self._fail_all(exc)
        finally:
            self.finished_at = time.monotonic()
            self.commands.close()
            self._settle_leftovers()
            self._publish()
            try:
                self.backend.close()
            finally:
                LIVE.discard(self)
                self.done.set()

    def _timeout(self) -> int | None:
        """Milliseconds until the next timer; 0 when commands wait (see wakeup.py)."""
        if not self.commands.sleep_allowed():
            return 0
        ats = [at for at in (self.timers.next_at(), self.book.queue.next_due()) if at]
        if not ats:
            return None
        return max(0, math.ceil((min(ats) - time.monotonic()) * 1000))

    def _step(
        self,
        woken: bool,
        readable: list[WorkerView],
        writable: list[WorkerView],
        dead: list[WorkerView],
    ) -> bool:
        """One pass of the loop; True when the supervisor is finished."""
        now = time.monotonic()
        if woken:
            self.commands.woken()
        for w in writable:
            w.proc.channel.flush()  # False: it died; its sentinel tells
        for w in readable:
            self._read(w, now)
        self._run_commands()
        if self.terminating:
            return True
        for w in dead:
            if w.slot in self.workers:
                self._on_exit(w, now)
        self._fire_timers(now)
        if self.draining:
            self._take_back_prefetched()
            self.cancelled.extend((block, None) for block in self.book.abandon())
        if self.broken is not None:  # whatever reaches the queue of a broken pool fails
            self.book.fail_unsent(self.broken)
        self._start_workers(now)
        self._dispatch(now)
        for w in self.workers.values():
            self.watch.want_write(w, w.proc.channel.wants_write)
        return self._maybe_stop(now)

    def _run_commands(self) -> None:
        new: list[Block] = []  # the blocks of consecutive submits, added at once
        while (command := self.commands.pop()) is not None:
            kind = command[0]
            if kind == "submit":
                new += command[1]
                continue
            if new:
                self.book.add(new)
                new = []
            if kind == "cancel":
                self.book.cancel(command[1])
            elif kind == "close":
                self.closing = True
            elif kind == "drain":
                self.draining = True
            elif kind == "terminate":
                self._terminate()
                return
        if new:
            self.book.add(new)

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
    def _read(self, w: WorkerView, now: float) -> None:
        try:
            frames = w.proc.channel.receive()
        except EOFError:  # a dying worker's pipe; its sentinel reports the death
            self.watch.forget(w.proc.channel.fileno())
            return
        for frame in frames:
            try:
                message = loads(frame)
            except BaseException:  # not ours to trust: a frame from a broken writer
                log.debug("unreadable message from worker %s", w.pid, exc_info=True)
                continue
            self._on_message(w, message, now)

    def _on_message(self, w: WorkerView, message: tuple[Any, ...], now: float) -> None:
        tag = message[0]
        if tag == RESULTS:
            _, ids, outcomes, elapsed, blob, retiring = message
            self._on_results(w, ids, outcomes, elapsed, blob, now)
            if retiring:
                log.debug("worker %s retires (%s)", w.pid, retiring)
                w.retiring = True
                self.book.requeue(w.take_all())
        elif tag == READY:
            w.ready = True
            self.start_failures = 0
            self.timers.cancel(("start", w.slot))
        elif tag == RETURNED:  # the answer to a STEAL: to the front of the queue, free
            self.book.requeue(w.returned(set(message[1])))
        elif tag == START_FAILED:
            w.start_error = JobError(KIND_ERROR, *message[1])
        elif tag == EXITING:  # its peak memory: runs shorter than an RSS sample see it too
            self.peak_rss = max(self.peak_rss, message[1])

    def _on_results(
        self,
        w: WorkerView,
        ids: list[int],
        outcomes: list[int],
        elapsed: list[float],
        blob: bytes,
        now: float,
    ) -> None:
        blocks = w.answered(ids)
        if not blocks:
            return
        w.stealing = False
        try:
            values = loads(blob)
        except BaseException as exc:  # a value that pickled in the worker but cannot load here
            self.book.unloadable([b for b in blocks if b is not None], exc, now)
            return
        stage = blocks[0].stage if blocks[0] is not None else 0
        if outcomes.count(OK) == len(ids) and None not in blocks:  # the common case
            self.book.complete_all(cast("list[Block]", blocks), values, elapsed)
        else:
            w.assigned -= self.book.settle(blocks, outcomes, elapsed, values, now)
        total = sum(elapsed)
        w.jobs += len(ids)
        w.busy += total
        if outcomes[0] != SPLIT:  # split jobs did not run: nothing was timed
            self.samples[stage].extend(elapsed)
            self.sizer.timed(stage, total, len(ids))

    # -- deaths --------------------------------------------------------------------------------
    def _on_exit(self, w: WorkerView, now: float) -> None:
        self._read(w, now)  # results it sent before dying still count
        job_id, started_at = w.proc.running()
        self._forget(w)
        code = w.proc.reap()  # dead for sure, its process group swept: nothing runs twice
        running: Block | None = None
        error: JobError | None = None
        if w.killed_for is not None:
            running, error = w.killed_for
            if running not in w.held:
                running = None  # its result made it out before the kill
        elif w.held and not w.stopping:
            running = self._blame(w, job_id)
            message = f"worker {w.pid} died while running the job: {describe_exit(code)}"
            error = JobError(KIND_CRASH, "WorkerCrashed", message, "", code)
        if running is not None:
            w.held.remove(running)
        self.book.requeue(w.take_all())
        if running is not None and error is not None:
            if error.kind == KIND_CRASH:
                log.info(
                    "job %s: worker %s crashed (%s)", running.index[0], w.pid, describe_exit(code)
                )
            elapsed = max(0.0, now - started_at)
            self.book.attempt_failed(running, error, retryable=True, elapsed=elapsed, now=now)
        if not w.ready and not w.stopping and not self.terminating:
            message = f"worker {w.pid} died before it was ready: {describe_exit(code)}"
            self._start_failed(
                w.start_error or JobError(KIND_ERROR, "WorkerCrashed", message, "", code)
            )

    def _blame(self, w: WorkerView, job_id: int) -> Block | None:
        """The job to charge, as a block of its own; or None: then every held job reruns
        alone to find it."""
        found, rerun_alone = attribute(w.held, job_id)
        if rerun_alone:
            self.book.requeue(w.take_all(), solo=True)
        return None if found is None else w.isolate(*found)

    def _forget(self, w: WorkerView) -> None:
        """Stop watching a worker: its descriptors close when it is reaped."""
        del self.workers[w.slot]
        for key in (("watch", w.slot), ("stop", w.slot), ("start", w.slot)):
            self.timers.cancel(key)
        self.watch.remove(w)

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
                for each in self.workers.values():
                    self._sample_rss(each)
                self.timers.schedule(now + RSS_EVERY, "rss")
                continue
            kind, slot = cast("tuple[str, int]", key)
            w = self.workers.get(slot)
            if w is None:
                continue
            if kind == "watch":
                self._watch_attempt(w, now)
            elif kind == "start" and not w.ready:
                message = f"setup() did not finish within {self.start_timeout:g} s; killed"
                log.warning("worker %s: %s", w.pid, message)
                w.start_error = JobError(KIND_ERROR, "StartTimeout", message)
                w.proc.kill()
            elif kind == "stop":
                log.warning(
                    "worker %s did not exit within %g s of its stop (a hung teardown() or "
                    "a task's thread?); killed",
                    w.pid,
                    STOP_GRACE,
                )
                w.proc.kill()

    def _sample_rss(self, w: WorkerView) -> None:
        rss = w.proc.rss()
        if rss is not None:
            w.rss = rss
            self.peak_rss = max(self.peak_rss, rss)

    def _watch_attempt(self, w: WorkerView, now: float) -> None:
        """Kill a worker whose running attempt is past its deadline; else look again later."""
        if w.killed_for is not None:
            return
        job_id, started_at = w.proc.running()
        if job_id in (FLUSHING, UNPACKING):  # a hang while (un)pickling counts the first's
            block = w.held[0] if w.held else None
        else:
            found = find(w.held, job_id)
            block = None if found is None else found[0]
        timeout = self.policies[block.stage].timeout if block is not None else None
        if not timeout:
            self._schedule_watch(w, now)
            return
        deadline = started_at + timeout
        if now < deadline:
            self.timers.schedule(deadline, ("watch", w.slot))
            return
        message = f"attempt exceeded its {timeout:g} s timeout; worker {w.pid} killed"
        log.info("job %s: %s", _index_of(block, job_id), message)
        w.killed_for = (self._blame(w, job_id), JobError(KIND_TIMEOUT, "TimeoutError", message))
        w.proc.kill()

    def _schedule_watch(self, w: WorkerView, now: float) -> None:
        if not self.timed:
            return
        timeouts = [t for t in (self.policies[b.stage].timeout for b in w.held) if t]
        if timeouts:
            self.timers.schedule(now + min(timeouts), ("watch", w.slot))

    # -- workers -------------------------------------------------------------------------------
    def _start_workers(self, now: float) -> None:
        if self.broken is not None or self.terminating:
            return
        if self.closing and not self.book.unfinished:
            return
        for slot in [s for s in range(self.procs) if s not in self.workers]:
            if self.broken is not None:
                return
            self.starts += 1
            try:
                proc = self.backend.start_worker(slot)
            except Exception as exc:
                log.error("could not start a worker: %r", exc)
                self._start_failed(JobError(KIND_ERROR, type(exc).__name__, str(exc)))
                continue
            w = self.workers[slot] = WorkerView(proc)
            self.watch.add(w)
            self.timers.schedule(now + self.start_timeout, ("start", slot))

    # -- dispatch ------------------------------------------------------------------------------
    def _dispatch(self, now: float) -> None:
        workers = [w for w in self.workers.values() if w.open]
        if not workers:
            return
        queue = self.book.queue
        sizer = self.sizer
        workers.sort(key=lambda w: w.holding)
        for w in workers:
            head = queue.head()
            if head is None:
                break
            if w.stealing:
                continue
            size = sizer.jobs_per_message(head.stage)
            # Prefetch: the next batch waits in the worker's mailbox, so no round trip idles it
            # between batches; a batch stuck behind a long job is taken back by _steal.
            if w.holding > size:
                continue
            n = min(size, -(-len(queue) // len(workers)))
            probe = _pickled_size(head.data[0]) if sizer.should_probe(head.stage, n) else None
            n = sizer.fit_bytes(head.stage, n, probe)
            if self.max_tasks is not None:
                n = min(n, self.max_tasks - w.assigned)
            if n > 0:
                self._send(w, n, now)
        if not len(queue):
            self._steal(workers)

    def _steal(self, workers: list[WorkerView]) -> None:
        """An idle worker and nothing queued: take back jobs waiting behind running ones."""
        if any(not w.holding for w in workers):
            for w in workers:
                if w.holding > 1 and not w.stealing:
                    w.stealing = True
                    w.proc.send(STEAL_MESSAGE)

    def _take_back_prefetched(self) -> None:
        """A drain waits for running attempts only: jobs waiting in a worker's mailbox come
        back (and are dropped with the queue)."""
        for w in self.workers.values():
            if w.holding > 1 and not w.stealing and w.killed_for is None:
                w.stealing = True
                w.proc.send(STEAL_MESSAGE)

    def _send(self, w: WorkerView, n: int, now: float) -> None:
        blocks = self.book.take(n, w.pid)
        if not blocks:
            return  # their futures were cancelled
        try:
            blob = dumps(_data(blocks))
        except BaseException:  # a payload's __reduce__ may raise anything, SystemExit too
            blocks = self._drop_unpicklable(blocks, now)
            if not blocks:
                return
            blob = dumps(_data(blocks))
        jobs = count(blocks)
        keep = self.sizer.oversized(jobs, len(blob))
        if keep is not None:  # payloads grew past the estimate: a moderate message now
            blocks = self._keep(blocks, keep)
            jobs = keep
            blob = dumps(_data(blocks))
        self.sizer.sized(blocks[0].stage, len(blob), jobs)
        if len(blocks) == 1:
            block = blocks[0]
            header = dumps((RUN, list(block.ids), [block.stage] * jobs))
        else:
            ids: list[int] = []  # consecutive within each block
            stages: list[int] = []
            for block in blocks:
                ids += block.ids
                stages += [block.stage] * block.size
            header = dumps((RUN, ids, stages))
        if not w.proc.send(header, blob):
            self.book.requeue(blocks)  # it died; its sentinel will tell
            return
        w.sent(blocks)
        if ("watch", w.slot) not in self.timers:
            self._schedule_watch(w, now)

    def _keep(self, blocks: list[Block], keep: int) -> list[Block]:
        """The first ``keep`` jobs of ``blocks``; the rest go back to the queue."""
        kept: list[Block] = []
        for i, block in enumerate(blocks):
            if keep >= block.size:
                kept.append(block)
                keep -= block.size
                continue
            if keep:
                kept.append(block.cut(keep))
            self.book.requeue(blocks[i:])
            break
        return kept

    def _drop_unpicklable(self, blocks: list[Block], now: float) -> list[Block]:
        """Fail the jobs whose payload cannot be pickled (one attempt, never retried)."""
        good = []
        for block in blocks:
            lo = 0
            for i, data in enumerate(block.data):
                try:
                    dumps(data)
                    continue
                except BaseException as exc:
                    if lo < i:
                        good.append(block.part(lo, i))
                    self.book.unloadable([block.part(i, i + 1)], exc, now)
                lo = i + 1
            if lo == 0:
                good.append(block)
            elif lo < block.size:
                good.append(block.part(lo, block.size))
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

    def _kill_all(self) -> list[Block]:
        """Kill and reap every worker, whatever state the loop is in; the jobs they held."""
        held: list[Block] = []
        for w in list(self.workers.values()):
            try:
                w.proc.kill()
            except Exception:
                log.exception("could not kill worker %s", w.pid)
        for w in list(self.workers.values()):
            held.extend(w.take_all())
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
        message = f"the pool's supervisor failed: {exc!r}"
        self.broken = broken = JobError(KIND_ERROR, "SupervisorError", message)
        self.terminating = True
        jobs = self._kill_all()
        jobs.extend(self.book.queue.drain())
        self.book.sent = 0
        try:
            self._deliver()  # results made before the failure
        except BaseException:
            log.exception("delivering results failed")
        self._fail_jobs(jobs, broken)

    def _settle_leftovers(self) -> None:
        """Jobs submitted while the loop was ending: failed if the pool broke, else
        cancelled; never left waiting."""
        blocks = [b for cmd in self.commands.leftovers() if cmd[0] == "submit" for b in cmd[1]]
        if not blocks:
            return
        self.book.stages[0].submitted += count(blocks)
        if self.broken is not None:
            self._fail_jobs(blocks, self.broken)
        else:
            self.book.cancel_held(blocks, sent=False)
            self.cancelled.extend((block, None) for block in blocks)
            self._deliver()

    def _fail_jobs(self, blocks: list[Block], error: JobError) -> None:
        for block in blocks:
            try:
                self.book.stages[block.stage].failed += block.size
                block.consumer.deliver(Delivery([(block, block.failures(error))]))
            except BaseException:
                log.exception("could not fail %r", block)

    def _deliver(self) -> None:
        """Hand final results to their consumers, a Delivery each: consumers run user code
        (future callbacks) that may call back into the pool, or raise anything."""
        done, self.book.done = self.book.done, []
        cancelled, self.cancelled = self.cancelled, []
        for block, error in cancelled:
            try:
                for _ in range(block.size):  # once per job: a consumer may count them
                    block.consumer.cancel(block, error)
            except BaseException:
                log.exception("cancelling %r failed", block)
        by_consumer: dict[Any, list[tuple[Block, list[JobResult]]]] = {}
        for run in done:
            runs = by_consumer.get(run[0].consumer)
            if runs is None:
                by_consumer[run[0].consumer] = [run]
            else:
                runs.append(run)
        for consumer, runs in by_consumer.items():
            try:
                consumer.deliver(Delivery(runs))
            except BaseException:
                log.exception("delivering results failed")


def _data(blocks: list[Block]) -> Sequence[Any]:
    """What the jobs of one message run on, as one sequence."""
    if len(blocks) == 1:
        return blocks[0].data
    data: list[Any] = []
    for block in blocks:
        data += block.data
    return data


def _index_of(block: Block | None, job_id: int) -> Any:
    """The JobResult.index of a held job, for a log line."""
    if block is None or job_id not in block.ids:
        return block.index[0] if block is not None else "?"
    return block.index[block.ids.index(job_id)]


def _pickled_size(data: Any) -> int:
    try:
        return len(dumps(data))
    except BaseException:
        return 0  # _send reports it as the job's serialization error
