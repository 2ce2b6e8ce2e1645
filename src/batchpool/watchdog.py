"""Attempt deadlines, and what a worker's death costs its jobs.

A worker whose running attempt overstays its stage's timeout is killed (SIGKILL: the job may be
stuck in C code, deaf to anything gentler); the kill records which job it was for. When a
worker dies, for that reason or any other, exactly one job is charged an attempt: the one it
was killed for, or the one its progress slot names (``ledger.attribute``, a pure function). Its
batch-mates go back to the queue uncharged. A new reason to kill a running job (a deadline, a
cancellation) is one more way to set ``killed_for`` here.
"""

from __future__ import annotations

import logging
from typing import Any

from .jobs import Block, JobBook
from .ledger import WorkerView, attribute, find
from .messages import FLUSHING, UNPACKING
from .processes import describe_exit
from .results import KIND_CRASH, KIND_TIMEOUT, JobError
from .task import Policy
from .timers import Timers

log = logging.getLogger("batchpool")


class Watchdog:
    def __init__(self, policies: list[Policy], timers: Timers, book: JobBook) -> None:
        self.policies = policies
        self.timed = any(p.timeout for p in policies)
        self.timers = timers  # ("watch", slot) are ours
        self.book = book

    def sent(self, w: WorkerView, now: float) -> None:
        """``w`` was sent jobs: watch its attempts, unless it is watched already."""
        if self.timed and ("watch", w.slot) not in self.timers:
            self._schedule(w, now)

    def check(self, w: WorkerView, now: float) -> None:
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
            self._schedule(w, now)
            return
        deadline = started_at + timeout
        if now < deadline:
            self.timers.schedule(deadline, ("watch", w.slot))
            return
        message = f"attempt exceeded its {timeout:g} s timeout; worker {w.pid} killed"
        log.info("job %s: %s", _index_of(block, job_id), message)
        w.killed_for = (self._blame(w, job_id), JobError(KIND_TIMEOUT, "TimeoutError", message))
        w.proc.kill()

    def charge(
        self, w: WorkerView, job_id: int, started_at: float, code: int | None, now: float
    ) -> None:
        """A reaped worker's death: one attempt of the job it was running fails (retryable);
        what else it held goes back to the queue, free. ``job_id`` and ``started_at`` are its
        progress slot, read before it was reaped."""
        running: Block | None = None
        error: JobError | None = None
        if w.killed_for is not None:
            running, error = w.killed_for
            if running not in w.held:
                running = None  # its result made it out before the kill
        elif w.held:  # a stopped worker answers all it holds first: it died running one
            running = self._blame(w, job_id)
            how = describe_exit(code, w.proc.exit_detail)
            message = f"worker {w.pid} died while running the job: {how}"
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

    def _schedule(self, w: WorkerView, now: float) -> None:
        if not self.timed:
            return
        timeouts = [t for t in (self.policies[b.stage].timeout for b in w.held) if t]
        if timeouts:
            self.timers.schedule(now + min(timeouts), ("watch", w.slot))

    def _blame(self, w: WorkerView, job_id: int) -> Block | None:
        """The job to charge, as a block of its own; or None: then every held job reruns
        alone to find it."""
        found, rerun_alone = attribute(w.held, job_id)
        if rerun_alone:
            self.book.requeue(w.take_all(), solo=True)
        return None if found is None else w.isolate(*found)


def _index_of(block: Block | None, job_id: int) -> Any:
    """The JobResult.index of a held job, for a log line."""
    if block is None or job_id not in block.ids:
        return block.index[0] if block is not None else "?"
    return block.index[block.ids.index(job_id)]
