"""What callers wait on: a submit()'s JobFuture, and the consumers the supervisor delivers
final results to (outbox.Outbox): Futures resolves the futures of submit(), a Collector queues
the results of one map() or imap() call for its calling thread."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError, _base
from typing import TYPE_CHECKING

from .errors import PoolBroken, PoolClosed
from .jobs import Block, Delivery
from .results import KIND_CANCELLED, JobError, JobResult

if TYPE_CHECKING:
    from .supervisor import Supervisor


def refuse_to_wait_in_callback(supervisor: Supervisor, call: str) -> None:
    """A future's done-callback runs in the pool's supervisor thread: waiting there for the
    pool's own jobs would wait forever (for a pass of the loop it holds up)."""
    if threading.current_thread() is supervisor.thread:
        raise RuntimeError(
            f"{call} in a done-callback of the pool's own future would wait forever: "
            "callbacks run in the pool's supervisor thread (submit() there does not wait)"
        )


def broken_message(error: JobError) -> str:
    if error.type == "SupervisorError":
        return error.message
    return f"workers cannot start: {error.type}: {error.message}"


class JobFuture(Future[JobResult]):
    """A submit()ted job. As in concurrent.futures, ``cancel()`` succeeds exactly when the
    future is neither RUNNING nor done. It is RUNNING while a worker holds the job, and PENDING
    whenever the job waits in the pool: queued, handed back unstarted, or between attempts (a
    retry's backoff): so it can be cancelled while queued or waiting for a retry, and a
    cancelled job never runs again (Metrics.cancelled)."""

    _job: Block
    _supervisor: Supervisor
    cancel_error = None  # the tag protocol (jobs.py): a Future resolves itself when cancelled

    @property
    def attempts(self) -> int:
        """Attempts made so far, in this stage and the ones before: a job that is not running
        and has made some waits for its retry. Ints the supervisor thread rebinds: safe to read
        from any thread."""
        return self._job.prior + self._job.attempts

    def result(self, timeout: float | None = None) -> JobResult:
        if not self.done():
            refuse_to_wait_in_callback(self._supervisor, "result() of a job not done yet")
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self.done():
            refuse_to_wait_in_callback(self._supervisor, "exception() of a job not done yet")
        return super().exception(timeout)

    def cancel(self) -> bool:
        with self._condition:
            if self._state in (_base.RUNNING, _base.FINISHED):
                return False
            if self._state != _base.PENDING:
                return True  # cancelled already
            self._notify_cancelled()
        self._invoke_callbacks()  # type: ignore[attr-defined]  # Future's own, untyped
        self._supervisor.post(("cancel", self._job))  # off the queue now, counted
        return True

    def claim(self) -> bool:
        """The supervisor sends the job to a worker: RUNNING from now on; False if it was
        cancelled (then it must not run)."""
        with self._condition:
            if self._state == _base.PENDING:
                self._state = _base.RUNNING  # no notify: result() waits once, for the end
                return True
            return self._state == _base.RUNNING

    def release(self) -> None:
        """The job is back in the pool's queue, not running (a retry waits for its backoff, or
        a worker handed it back unstarted): PENDING again, so cancel() can succeed."""
        with self._condition:
            if self._state == _base.RUNNING:
                self._state = _base.PENDING

    def _cancel_anyway(self) -> None:
        """Cancelled by the pool: terminate() (even while RUNNING, as the SPEC promises),
        cancel_pending() (a job handed back unstarted may still read RUNNING). The public
        protocol has no such transition, so these few steps use Future's own fields."""
        with self._condition:
            if self._state not in (_base.PENDING, _base.RUNNING):
                return
            self._notify_cancelled()
        self._invoke_callbacks()  # type: ignore[attr-defined]  # Future's own, untyped

    def _notify_cancelled(self) -> None:
        # With the condition held. Waiters of concurrent.futures.wait()/as_completed() are
        # told at once: no executor thread will call set_running_or_notify_cancel() later.
        self._state = _base.CANCELLED_AND_NOTIFIED
        for waiter in self._waiters:
            waiter.add_cancelled(self)
        self._condition.notify_all()


class Futures:
    """Consumer for submit(): resolves one Future per job."""

    def deliver(self, items: Delivery) -> None:
        for job, (result,) in items.runs:  # a Future's job has a block of its own
            # The job is final: the block lets go of its future, so the two make no cycle,
            # which only the cyclic GC would free (a server's pauses grew with them).
            future: JobFuture = job.tag
            job.tag = None
            if result.error is not None and result.error.kind == KIND_CANCELLED:
                future._cancel_anyway()  # cancel_pending()
                continue
            try:
                future.set_result(result)  # RUNNING, or PENDING if it never left the queue
            except InvalidStateError:
                pass  # cancelled by its owner meanwhile

    def cancel(self, job: Block, error: JobError | None) -> None:
        """terminate(): a future not yet running is cancelled; a running one resolves to a
        "cancelled" result (``error`` given: that failure instead)."""
        future: JobFuture | None = job.tag
        if future is None:
            return  # resolved already
        if error is None:
            future._cancel_anyway()
        else:
            self.deliver(Delivery([(job, job.failures(error))]))


class Collector:
    """Consumer for map()/imap(): results queue up here for the calling thread, a block's
    worth at a time: (the block's indexes, its results). The caller is woken once as many
    have come as it asked for: map() asks for all of them, so a map of a million jobs wakes
    its caller once, not at each batch."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.cond = threading.Condition(threading.Lock())
        self.items: deque[tuple[Sequence[int], list[JobResult]]] = deque()
        self.queued = 0  # results in items
        self.wanted = 1  # results the caller waits for
        self.lost: str | None = None

    def deliver(self, items: Delivery) -> None:
        with self.cond:
            for block, results in items.runs:
                self.items.append((block.index, results))
                self.queued += len(results)
            if self.queued >= self.wanted:
                self.cond.notify()

    def cancel(self, job: Block, error: JobError | None) -> None:
        with self.cond:
            self.lost = error.message if error else "the pool was terminated"
            self.cond.notify()

    def take(self, wanted: int = 1) -> list[tuple[Sequence[int], list[JobResult]]]:
        """Block until ``wanted`` results are in; return all that are, as (indexes, results)
        runs."""
        with self.cond:
            self.wanted = wanted
            while self.queued < wanted:
                if self.lost:
                    raise PoolClosed(f"results lost: {self.lost}")
                if self.supervisor.done.is_set():
                    if self.supervisor.broken is not None:
                        raise PoolBroken(broken_message(self.supervisor.broken))
                    raise PoolClosed("the pool stopped before all results came back")
                self.cond.wait(0.5)
            items = list(self.items)
            self.items.clear()
            self.queued = 0
            return items
