"""The pool's worker processes: started into empty slots, killed when they will not start or
will not stop, and given up on when starts keep failing.

How many workers should be alive is decided here: ``fill`` keeps ``target`` workers serving
(those stopping do not count) and never more than ``high`` alive (those do); ``resize`` and
``grow`` move the target (pool.resize(), autoscaling: scaler.py), ``retire`` stops one worker
cleanly, at once when it is idle, after its current job when busy. The supervisor decides only
when starting any is allowed. The jobs a worker holds are not this module's business:
``kill_all`` hands them back and the caller settles them.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
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
        take_back: Callable[[list[WorkerView]], None],
        high: int | None = None,
    ) -> None:
        self.backend = backend  # see backends/__init__.py
        self.initial = procs
        self.target = procs  # workers serving: alive and not stopping
        self.high = high or procs  # the most alive at once, stopping ones included
        self.stopping = 0  # workers alive that were asked to stop
        self.scaled_up = 0
        self.scaled_down = 0
        self.growth: deque[str] = deque()  # why each start owed to scaling is wanted
        self.lost: deque[str] = deque()  # workers gone on their own, for their replacement's log
        self.start_timeout = start_timeout
        self.timers = timers  # ("start"|"stop", slot) are ours; forget() cancels ("watch", slot)
        self.watch = watch
        self.give_up = give_up  # breaks the pool, once: starts keep failing
        self.take_back = take_back  # STEAL: jobs waiting in a worker's mailbox come back, free
        self.workers: dict[int, WorkerView] = {}  # slot -> worker
        self.starts = 0
        self.start_failures = 0
        self.gave_up = False
        self.peak_rss = 0

    @property
    def restarts(self) -> int:
        return max(0, self.starts - self.initial - self.scaled_up)

    # -- starting ------------------------------------------------------------------------------
    def fill(self, now: float) -> None:
        """Start workers into free slots until ``target`` serve, within ``high`` alive."""
        workers = self.workers
        missing = min(self.target - len(workers) + self.stopping, self.high - len(workers))
        if missing <= 0:
            return
        free = (s for s in itertools.count() if s not in workers)
        for slot in itertools.islice(free, missing):
            if self.gave_up:
                return
            self.starts += 1
            why = self.growth.popleft() if self.growth else None
            try:
                proc = self.backend.start_worker(slot)
            except Exception as exc:
                log.error("could not start a worker: %r", exc)
                self.start_failed(JobError(KIND_ERROR, type(exc).__name__, str(exc)))
                continue
            w = workers[slot] = WorkerView(proc)
            self.watch.add(w)
            self.timers.schedule(now + self.start_timeout, ("start", slot))
            name = w.pid or f"in slot {slot}"  # a Ray actor has a pid once Ray placed it
            if why is not None:
                self.scaled_up += 1
                log.info("scaling: worker %s started (%d alive): %s", name, len(workers), why)
            elif self.lost:
                log.info("worker %s replaces worker %s", name, self.lost.popleft())

    # -- how many ------------------------------------------------------------------------------
    def serving(self) -> list[WorkerView]:
        return [w for w in self.workers.values() if not w.stopping]

    def grow(self, why: str) -> None:
        """One more worker: fill() starts it."""
        self.target += 1
        self.growth.append(why)

    def resize(self, n: int, now: float, *, fixed: bool) -> None:
        """Serve ``n`` workers from now on (``fixed``: a pool of procs=N, whose most alive
        becomes ``n`` too); the surplus retires, those without jobs first."""
        if fixed:
            self.high = n
        serving = self.serving()
        # starts still owed to workers that died (restarts), and those owed to scaling
        replacing = min(max(0, self.target - len(serving) - len(self.growth)), n)
        owed = max(0, n - len(serving) - replacing)
        why = f"resize({n})"
        while len(self.growth) > owed:
            self.growth.pop()
        self.growth.extend([why] * (owed - len(self.growth)))
        for w in by_idleness(serving)[: max(0, len(serving) - n)]:
            self.retire(w, now, why)
        self.target = n

    def retire(self, w: WorkerView, now: float, why: str) -> None:
        """Stop ``w`` cleanly, uncounted from the target: an idle worker stops now, a busy
        one once its jobs are done (STOP waits behind them in its mailbox)."""
        self.target -= 1
        self.scaled_down += 1
        self.take_back([w])  # before STOP, which ends what the worker reads
        self.stop_one(w, now)
        serving = len(self.workers) - self.stopping
        log.info("scaling: worker %s retires (%d serving): %s", w.pid, serving, why)

    def stop_one(self, w: WorkerView, now: float) -> None:
        w.stopping = True
        self.stopping += 1
        w.proc.send(STOP_MESSAGE)
        if not w.holding:
            self.timers.schedule(now + STOP_GRACE, ("stop", w.slot))

    def idle(self, w: WorkerView, now: float) -> None:
        """``w`` holds no job any more: a stopping worker's grace for teardown() starts."""
        w.idle_since = now
        if w.stopping and ("stop", w.slot) not in self.timers:
            self.timers.schedule(now + STOP_GRACE, ("stop", w.slot))

    def started(self, w: WorkerView, pid: int, now: float) -> None:
        """A worker started late (a Ray actor, placed once the cluster had room for it) has a
        process: its pid, and its start_timeout from now on."""
        w.pid = pid
        if not w.ready:
            self.timers.schedule(now + self.start_timeout, ("start", w.slot))

    def ready(self, w: WorkerView, now: float) -> None:
        w.ready = True
        w.idle_since = now
        self.start_failures = 0
        self.timers.cancel(("start", w.slot))

    def start_overdue(self, w: WorkerView, now: float) -> None:
        if w.ready:
            return
        if not w.pid:  # started late (a Ray actor), and not yet: no room for it in the cluster
            serving = sum(o.ready and not o.stopping for o in self.workers.values())
            if serving:
                # Capacity missing, not a broken pool: it waits on (the backend keeps asking
                # for room) while the others serve; only a pool that none serves gives up.
                log.info("worker slot %d: no room for it yet; %d workers serve", w.slot, serving)
                self.timers.schedule(now + self.start_timeout, ("start", w.slot))
                return
            message = f"no room for the worker in {self.start_timeout:g} s (no free CPU?); killed"
        else:
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
    def sample_rss(self, workers: Any = None) -> None:
        for w in self.workers.values() if workers is None else workers:
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
        if not w.stopping:
            why = "retired" if w.retiring else describe_exit(code, w.proc.exit_detail)
            self.lost.append(f"{w.pid} ({why})")
        if not w.ready and not w.stopping:
            how = describe_exit(code, w.proc.exit_detail)
            message = f"worker {w.pid} died before it was ready: {how}"
            self.start_failed(
                w.start_error or JobError(KIND_ERROR, "WorkerCrashed", message, "", code)
            )

    def stop(self, now: float) -> bool:
        """Ask every worker to stop (they run teardown()); True once none is left."""
        for w in self.workers.values():
            if not w.stopping:
                self.stop_one(w, now)
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
        if w.stopping:
            self.stopping -= 1
        for key in (("watch", w.slot), ("stop", w.slot), ("start", w.slot)):
            self.timers.cancel(key)
        self.watch.remove(w)


def by_idleness(workers: list[WorkerView]) -> list[WorkerView]:
    """The order to retire workers in: without jobs first (starting ones, then the longest
    idle), busy ones last."""
    return sorted(workers, key=lambda w: (w.holding > 0, w.ready, w.idle_since))
