"""The supervisor: one thread that owns every job and every worker of a pool.

    callers (any thread)         supervisor thread                           workers
    submit / cancel / cancel_pending / close / terminate
        --> Commands (wakeup.py)
                                 loop (_step):
                                   Watch.wait    wakeup, channels, pidfds, next timer
                                   1. commands   new jobs, cancels, close, drain, terminate
                                   2. messages   RESULTS, READY, RETURNED...  <-- own channel
                                                 (inbox.py)
                                   3. deaths     the running job: crash/timeout attempt
                                                 (watchdog.py); the rest requeued, free
                                   4. timers     retries due; attempt deadlines (watchdog.py);
                                                 start deadlines, stop grace, RSS (workforce.py);
                                                 call deadlines (cancelling.py)
                                   5. workers    replace the dead and the retired (workforce.py)
                                   6. dispatch   batches sized by sizing.BatchSizer -->
                                                 (dispatch.py); then, for procs=(min, max),
                                                 grow under a backlog (scaler.py)
                                   7. publish    the counters metrics() reads
                                   8. deliver    final JobResults, to their consumers (outbox.py)

This module is the loop; each step's work lives with its owner, one object each, all touched
by this thread only: jobs.JobBook (job state; its scheduler.Scheduler orders the queue),
inbox.Inbox (what workers say), dispatch.Dispatcher (who gets which jobs), watchdog.Watchdog
(attempt deadlines, and which job a death charges), workforce.Workforce (the worker
processes; scaler.Scaler sizes it for procs=(min, max)), cancelling.Cancels (cancellations
that reach into workers' hands: cancel_pending(), deadlines), outbox.Outbox (how jobs leave).
Jobs travel in blocks (jobs.Block: a run of jobs that share their way, so the loop pays per
block, not per job); what a worker holds is its ledger.WorkerView. Nothing in the loop blocks:
channels queue what a worker cannot take yet (channel.py), so a job stuck in C code holding its
worker's GIL cannot stop the timer that kills it. Other threads read what step 7 publishes,
never a half-made change, and never wait for the loop.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from typing import Any, cast

from .cancelling import Cancels
from .dispatch import Dispatcher
from .inbox import Inbox
from .jobs import Block, Counts, JobBook
from .ledger import WorkerView
from .outbox import Outbox
from .processes import block_group_signals
from .registry import LIVE
from .results import KIND_ERROR, JobError, Metrics, StageMetrics, WorkerStats
from .sampling import Reservoir
from .scaler import SCALE, Scaler
from .scaling import Bounds
from .sizing import BatchSizer
from .task import Policy
from .timers import Timers
from .wakeup import Commands
from .watch import Watch
from .watchdog import Watchdog
from .workforce import Workforce

log = logging.getLogger("batchpool")
# ("submit", blocks), ("submit_until", blocks, deadline), ("cancel", block),
# ("cancel_pending", reply), ("abandon", collector), ("deadline_off", deadline), ("close",),
# ("drain",), ("resize", n), ...
Command = tuple[Any, ...]
SUBMITS = ("submit", "submit_until")
# what metrics() reads: per-stage counts, queued, sent, (pid, jobs, busy, rss) per worker,
# restarts, peak RSS, scaled up, scaled down
View = tuple[list[Counts], int, int, list[tuple[int, int, float, int]], int, int, int, int]

RSS_EVERY = 1.0  # seconds between psutil samples of worker memory
QUIET_MAX = 0.05  # seconds a submit that did not wake the loop waits for a pass, at most


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
        batch_seconds: float,
        bounds: Bounds | None = None,
        lazy_submits: bool = False,
    ) -> None:
        """``bounds``: scale between them (procs=(min, max)); ``procs`` workers start.
        ``lazy_submits``: see sizing.Tuning."""
        self.lazy_submits = lazy_submits
        self.book = JobBook(policies, random.random)
        # streaming.window reads its estimates
        deadlines = [p.timeout for p in policies] if backend.batch_deadline else []
        self.sizer = BatchSizer(len(policies), chunksize, batch_seconds, deadlines)
        self.timers = Timers()  # ("watch"|"stop"|"start"|"flush", slot), "rss"
        self.commands: Commands[Command] = Commands()
        self.watch: Watch[WorkerView] = Watch(self.commands.fileno())
        self.dispatcher = Dispatcher(self.book, self.sizer, max_tasks)
        self.watchdog = Watchdog(policies, self.timers, self.book)
        self.workforce = Workforce(
            backend,
            procs,
            start_timeout,
            self.timers,
            self.watch,
            give_up=self._break,
            take_back=self.dispatcher.take_back_prefetched,
            high=bounds.high if bounds else None,
        )
        self.workers = self.workforce.workers  # slot -> worker; the same dict, for short lines
        self.outbox = Outbox(self.book)
        self.cancels = Cancels(self.book, self.timers, self.workers)
        self.scaler = (
            None
            if bounds is None
            else Scaler(bounds, self.workforce, self.book, self.timers, time.monotonic())
        )
        self.samples = [Reservoir() for _ in policies]  # attempt times per stage
        self.inbox = Inbox(
            self.book,
            self.sizer,
            self.samples,
            self.workforce,
            self.cancels,
            self.scaler,
            self.watch,
        )
        self.begun = False
        self.closing = False
        self.draining = False  # drop jobs not in a worker's hands (a run being stopped)
        self.terminating = False
        self.broken: JobError | None = None
        self.started_at = time.monotonic()
        self.finished_at: float | None = None
        self._view: View
        self._publish()
        self.done = threading.Event()
        self.thread: threading.Thread | None = None  # the one that makes its passes

    # -- called from any thread ----------------------------------------------------------------
    def start(self) -> None:
        """The loop, in a thread of its own (hosting.Host makes its passes on an event loop
        instead, and calls this if the event loop ends first)."""
        LIVE.add(self)
        self.thread = threading.Thread(target=self._run, name="batchpool-supervisor", daemon=True)
        self.thread.start()

    def post(self, command: Command, *, urgent: bool = True) -> bool:
        """Queue a command for the loop; False once the loop has ended. One that is not
        ``urgent`` (a submit, with ``lazy_submits``) may wait for the loop's next pass."""
        return self.commands.post(command, urgent=urgent)

    def snapshot(self) -> Metrics:
        """What the loop last published: consistent, and never waits for the loop."""
        elapsed = (self.finished_at or time.monotonic()) - self.started_at
        return _metrics(self._view, self.samples, elapsed)

    def pids(self) -> list[int]:
        return [w[0] for w in self._view[3] if w[0]]  # 0: an actor Ray has not placed yet

    # -- the loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        """The loop, in the supervisor's own thread (or hosting.Host's passes instead)."""
        block_group_signals()  # so that the main thread gets them
        try:
            if not self.begun:  # else begun on an event loop that ended first (hosting.py)
                self.begin()
            while not self.step(self.wait_ms()):
                pass
        except BaseException as exc:
            self.failed(exc)
        finally:
            self.finish()

    def begin(self) -> None:
        self.begun = True
        self.timers.schedule(time.monotonic() + RSS_EVERY, "rss")
        self._start_workers(time.monotonic())
        self._hand_over()

    def step(self, timeout_ms: int | None) -> bool:
        """Wait up to ``timeout_ms`` (None: until woken) for the workers and the commands,
        make one pass and hand over what it finished; True once the supervisor is done."""
        done = self._step(*self.watch.wait(timeout_ms))
        self._hand_over()
        return done

    def _hand_over(self) -> None:
        self._publish()
        self.outbox.deliver()
        self.cancels.answer()

    def failed(self, exc: BaseException) -> None:
        log.error("the pool's supervisor failed (%r); the pool is broken", exc)
        log.debug("the supervisor's traceback", exc_info=True)
        self._fail_all(exc)

    def finish(self) -> None:
        """After the last pass: whoever still waits is answered, and ``done`` is set."""
        self.finished_at = time.monotonic()
        self.commands.close()
        leftovers = self.commands.leftovers()
        self.outbox.settle_leftovers(
            [b for cmd in leftovers if cmd[0] in SUBMITS for b in cmd[1]], self.broken
        )
        self.cancels.close([cmd[1] for cmd in leftovers if cmd[0] == "cancel_pending"])
        self._publish()
        try:
            self.workforce.backend.close()
        finally:
            self.watch.close()
            LIVE.discard(self)
            self.done.set()

    def wait_ms(self) -> int | None:
        """Milliseconds until the next timer; 0 when commands wait (see wakeup.py). Right
        before the loop sleeps: it tells the commands whether a post must wake it."""
        quiet = False
        if self.lazy_submits:  # else never quiet: no lock taken for it per pass
            quiet = self._reports_coming()
            self.commands.set_quiet(quiet)
        if not self.commands.sleep_allowed():
            return 0
        ats = [at for at in (self.timers.next_at(), self.book.queue.next_due()) if at]
        if quiet:  # a submit that did not wake the loop waits this long at most
            ats.append(time.monotonic() + QUIET_MAX)
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
            self.inbox.read(w, now)
        self._run_commands(now)
        if self.terminating:
            return True
        for w in dead:
            if w.slot in self.workers:
                self._on_exit(w, now)
        self._fire_timers(now)
        if self.draining:
            self.dispatcher.take_back_prefetched(self.workers.values())
            self.outbox.cancel(self.book.abandon())
        if self.broken is not None:  # whatever reaches the queue of a broken pool fails
            self.book.fail_unsent(self.broken)
        self._start_workers(now)
        self._dispatch(now)
        if self.scaler is not None and not self.draining and self.scaler.after_dispatch(now):
            self._start_workers(now)
        for w in self.workers.values():
            self.watch.want_write(w, w.proc.channel.wants_write)
        if not self.closing or self.book.unfinished or self.commands:
            return False
        return self.workforce.stop(now)  # closed and nothing left: done once workers are gone

    def _run_commands(self, now: float) -> None:
        new: list[Block] = []  # the blocks of consecutive submits, added at once
        while (command := self.commands.pop()) is not None:
            kind = command[0]
            if kind == "submit":
                new += command[1]
                continue
            if kind == "submit_until":  # a call's blocks, with its Deadline
                new += self.cancels.submit(command[1], command[2])
                continue
            if new:
                self.book.add(new)
                new = []
            if kind == "cancel":
                self.book.cancel(command[1])
            elif kind == "cancel_pending":
                self.cancels.cancel_pending(command[1])
            elif kind == "abandon":
                self.cancels.abandon(command[1])
            elif kind == "deadline_off":
                self.cancels.forget(command[1])
            elif kind == "close":
                self.closing = True
            elif kind == "drain":
                self.draining = True
            elif kind == "resize":
                self.workforce.resize(command[1], now, fixed=self.scaler is None)
            elif kind == "terminate":
                self._terminate()
                return
        if new:
            self.book.add(new)

    def _reports_coming(self) -> bool:
        """Every worker that may take jobs holds some, so one will report soon (a batch's
        end, a flush), and no job could start before that anyway."""
        if self.closing or self.draining or self.broken is not None:
            return False
        return all(w.holding for w in self.workers.values() if w.open)

    def _publish(self) -> None:
        book = self.book
        self._view = (
            [stage.counts() for stage in book.stages],
            book.queued,
            book.sent,
            [(w.pid, w.jobs, w.busy, w.rss) for w in self.workers.values()],
            self.workforce.restarts,
            self.workforce.peak_rss,
            self.workforce.scaled_up,
            self.workforce.scaled_down,
        )

    # -- deaths, timers, workers, dispatch: the owners' work, in the loop's order ---------------
    def _on_exit(self, w: WorkerView, now: float) -> None:
        self.inbox.read(w, now)  # results it sent before dying still count
        job_id, started_at = w.proc.running()
        code = self.workforce.reap(w)
        self.cancels.died(w, job_id)
        self.watchdog.charge(w, job_id, started_at, code, now)
        self.workforce.exited(w, code)

    def _fire_timers(self, now: float) -> None:
        self.book.queue.release(now)
        for key, payload in self.timers.pop_due(now):
            if key == "rss":
                self.workforce.sample_rss()
                self.timers.schedule(now + RSS_EVERY, "rss")
            if key in ("rss", SCALE):
                if self.scaler is not None and not self.draining:
                    self.scaler.tick(now)
                continue
            kind, slot = cast("tuple[str, int]", key)
            if kind == "deadline":
                self.cancels.expire(payload)
                continue
            w = self.workers.get(slot)
            if w is None:
                continue
            if kind == "watch":
                self.watchdog.check(w, now)
            elif kind == "start":
                self.workforce.start_overdue(w, now)
            elif kind == "stop":
                self.workforce.stop_overdue(w)
            elif kind == "flush":
                self.cancels.flushed(w)

    def _start_workers(self, now: float) -> None:
        if self.broken is not None or self.terminating:
            return
        if self.closing and not self.book.unfinished:
            return
        self.workforce.fill(now)

    def _dispatch(self, now: float) -> None:
        for w in self.dispatcher.dispatch(self.workers.values(), now):
            self.watchdog.sent(w, now)

    # -- ending --------------------------------------------------------------------------------
    def _break(self, error: JobError) -> None:
        """Workers cannot be started: what is queued, and all that comes, fails."""
        self.broken = error
        self.book.fail_unsent(error)

    def _terminate(self) -> None:
        """Kill every worker now; unfinished jobs are cancelled."""
        self.terminating = True
        self.outbox.terminate(self.workforce.kill_all())

    def _fail_all(self, exc: BaseException) -> None:
        """The loop itself failed: break the pool, kill its workers and fail every job it
        knows of."""
        message = f"the pool's supervisor failed: {exc!r}"
        self.broken = broken = JobError(KIND_ERROR, "SupervisorError", message)
        self.terminating = True
        self.outbox.fail_all(self.workforce.kill_all(), broken)


def _metrics(view: View, samples: list[Reservoir], elapsed: float) -> Metrics:
    stages, queued, sent, workers, restarts, peak, scaled_up, scaled_down = view
    per_stage = [
        StageMetrics(
            *counts,
            sample.quantile(0.5),
            sample.quantile(0.95),
            tuple(sample.buckets),
            sample.total,
        )
        for counts, sample in zip(stages, samples, strict=True)
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
        scaled_up=scaled_up,
        scaled_down=scaled_down,
        queued=queued,
        in_flight=sent,
        workers=len(workers),
        elapsed=elapsed,
        per_worker=tuple(WorkerStats(*w) for w in workers),
        peak_rss=peak,
        stages=tuple(per_stage),
    )
