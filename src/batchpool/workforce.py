"""The pool's worker processes: started into empty slots, killed when they will not start or
will not stop, and given up on when starts keep failing.

How many workers should be alive is decided here (``fill``: today one per slot of ``procs``);
the supervisor decides only when starting any is allowed. The jobs a worker holds are not this
module's business: ``kill_all`` hands them back and the caller settles them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .jobs import Block
from .ledger import WorkerView
from .messages import STOP, dumps
from .processes import describe_exit
from .results import KIND_ERROR, JobError
from .timers import Timers
from .watch import Watch

log = logging.getLogger("batchpool")
STOP_MESSAGE = dumps((STOP,))

MAX_START_FAILURES = 3  # consecutive failed worker starts before the pool gives up
STOP_GRACE = 10.0  # seconds a stopped worker gets for teardown() before it is killed


class Workforce:
    def __init__(
        self,
        backend: Any,
        procs: int,
        start_timeout: float,
        timers: Timers,
        watch: Watch[WorkerView],
        give_up: Callable[[JobError], None],
    ) -> None:
        self.backend = backend  # see backends/__init__.py
        self.procs = procs
        self.start_timeout = start_timeout
        self.timers = timers  # ("start"|"stop", slot) are ours; forget() cancels ("watch", slot)
        self.watch = watch
        self.give_up = give_up  # breaks the pool, once: starts keep failing
        self.workers: dict[int, WorkerView] = {}  # slot -> worker
        self.starts = 0
        self.start_failures = 0
        self.gave_up = False
        self.peak_rss = 0

    @property
    def restarts(self) -> int:
        return max(0, self.starts - self.procs)

    # -- starting ------------------------------------------------------------------------------
    def fill(self, now: float) -> None:
        """Start a worker in every empty slot."""
        for slot in [s for s in range(self.procs) if s not in self.workers]:
            if self.gave_up:
                return
            self.starts += 1
            try:
                proc = self.backend.start_worker(slot)
            except Exception as exc:
                log.error("could not start a worker: %r", exc)
                self.start_failed(JobError(KIND_ERROR, type(exc).__name__, str(exc)))
                continue
            w = self.workers[slot] = WorkerView(proc)
            self.watch.add(w)
            self.timers.schedule(now + self.start_timeout, ("start", slot))

    def ready(self, w: WorkerView) -> None:
        w.ready = True
        self.start_failures = 0
        self.timers.cancel(("start", w.slot))

    def start_overdue(self, w: WorkerView) -> None:
        if w.ready:
            return
        message = f"setup() did not finish within {self.start_timeout:g} s; killed"
        log.warning("worker %s: %s", w.pid, message)
        w.start_error = JobError(KIND_ERROR, "StartTimeout", message)
        w.proc.kill()

    def start_failed(self, error: JobError) -> None:
        self.start_failures += 1
        log.warning("worker failed to start: %s: %s", error.type, error.message)
        if self.start_failures >= MAX_START_FAILURES and not self.gave_up:
            log.error("workers failed to start %d times in a row; giving up", self.start_failures)
            self.gave_up = True
            self.give_up(error)

    # -- memory --------------------------------------------------------------------------------
    def sample_rss(self) -> None:
        for w in self.workers.values():
            rss = w.proc.rss()
            if rss is not None:
                w.rss = rss
                self.peak_rss = max(self.peak_rss, rss)

    def exiting(self, peak: int) -> None:
        """A worker's own peak at its exit: runs shorter than an RSS sample see it too."""
        self.peak_rss = max(self.peak_rss, peak)

    # -- ending --------------------------------------------------------------------------------
    def reap(self, w: WorkerView) -> int | None:
        """A dead worker's exit status. Once reaped it is dead for sure and its process group
        swept: nothing it ran can run twice."""
        self.forget(w)
        code: int | None = w.proc.reap()
        return code

    def exited(self, w: WorkerView, code: int | None) -> None:
        """A worker that died before it was ready is a failed start."""
        if not w.ready and not w.stopping:
            message = f"worker {w.pid} died before it was ready: {describe_exit(code)}"
            self.start_failed(
                w.start_error or JobError(KIND_ERROR, "WorkerCrashed", message, "", code)
            )

    def stop(self, now: float) -> bool:
        """Ask every worker to stop (they run teardown()); True once none is left."""
        for w in self.workers.values():
            if not w.stopping:
                w.stopping = True
                w.proc.send(STOP_MESSAGE)
                self.timers.schedule(now + STOP_GRACE, ("stop", w.slot))
        return not self.workers

    def stop_overdue(self, w: WorkerView) -> None:
        log.warning(
            "worker %s did not exit within %g s of its stop (a hung teardown() or a task's "
            "thread?); killed",
            w.pid,
            STOP_GRACE,
        )
        w.proc.kill()

    def kill_all(self) -> list[Block]:
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
                self.reap(w)
            except Exception:
                log.exception("could not reap worker %s", w.pid)
        self.workers.clear()
        return held

    def forget(self, w: WorkerView) -> None:
        """Stop watching a worker: its descriptors close when it is reaped."""
        del self.workers[w.slot]
        for key in (("watch", w.slot), ("stop", w.slot), ("start", w.slot)):
            self.timers.cancel(key)
        self.watch.remove(w)
