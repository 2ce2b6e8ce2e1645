"""Cancellation past the queue: ``Pool.cancel_pending()``, the deadlines of map()/imap(), and
an imap() left before its end (``Cancels.abandon``).

The queue's part is the book's (``JobBook.cancel_queued``). Jobs in a worker's hands are
reached here, by the supervisor's thread:

- not started (prefetched into its mailbox): asked back with STEAL. A ``Recall`` names the jobs
  it wants; the RETURNED answer hands back what had not started, and the jobs a recall wants are
  cancelled instead of requeued. A worker answers its STEALs in order, so a recall is done with
  a worker once it answered every STEAL sent up to the recall's own (or once it died); until
  then the worker gets no new jobs, so all it holds was there when the recall began.
- running (a deadline only): the worker is killed and replaced. First it is asked to FLUSH: a
  local worker sends the results of a batch every Tuning.flush_every seconds or at its end, so
  jobs of the call that ended just before the running one may not be in yet, and they ran to
  completion. It gets no new jobs meanwhile; it is killed when FLUSHED comes (its RESULTS come
  ahead: they complete those jobs as usual), or after FLUSH_GRACE seconds (a reader thread stuck
  behind a job that holds the GIL). Then the expired call's jobs it still holds end as
  "cancelled" results at once (their results that it sends before it dies are ignored); the
  others go back to the queue, free, once it is reaped (its ``killed_for`` charges no job). A
  worker that dies while flushing is a death like any other (``died``). Ray actors are killed
  at once: an actor's call answers its whole batch, so nothing it ended waits in a buffer.

A ``Deadline`` is the tag of the blocks of one call (see jobs.py): it refuses them at dispatch
once it has expired, so none of its jobs starts after its deadline, whatever path brought it
back to the queue. ``cancel_pending()`` answers its caller after the next delivery, so that the
futures it cancelled are cancelled when it returns.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from .jobs import Block, JobBook
from .ledger import UNSURE, WorkerView, find
from .messages import FLUSH, dumps
from .results import KIND_CANCELLED, JobError
from .timers import Timers

log = logging.getLogger("batchpool")
CANCELLED = "Cancelled"  # JobError.type of a cancelled job
PENDING_CANCELLED = JobError(
    KIND_CANCELLED, CANCELLED, "cancelled by cancel_pending() before it started"
)
ABANDONED = JobError(KIND_CANCELLED, CANCELLED, "its imap() was closed before it started")
_serials = itertools.count()
FLUSH_MESSAGE = dumps((FLUSH,))
FLUSH_GRACE = 0.2  # seconds a worker stopped by a deadline has to send what it finished


class Deadline:
    """The tag of the blocks of one map() or imap() call with a deadline (see jobs.py)."""

    __slots__ = ("at", "seconds", "expired", "cancel_error", "key")

    def __init__(self, seconds: float, now: float) -> None:
        self.at = now + seconds  # time.monotonic()
        self.seconds = seconds
        self.expired = False  # set by the supervisor's thread; the caller's reads it
        message = f"the call's deadline of {seconds:g} s passed before the job finished"
        self.cancel_error = JobError(KIND_CANCELLED, CANCELLED, message)
        self.key = ("deadline", next(_serials))  # its timer's

    def claim(self) -> bool:
        return not self.expired

    def release(self) -> None:
        """Nothing to do: a call's jobs have no state of their own to wind back."""

    def passed(self, now: float) -> bool:
        return self.expired or now >= self.at


class Recall:
    """One cancellation that reaches into workers' hands: the jobs ``wanted`` names."""

    __slots__ = ("wanted", "error", "stop_running", "count", "waiting", "reply")

    def __init__(
        self,
        wanted: Callable[[Block], bool],
        error: JobError,
        *,
        stop_running: bool,
        reply: Future[int] | None = None,
    ) -> None:
        self.wanted = wanted
        self.error = error
        self.stop_running = stop_running  # a deadline: running attempts are stopped too
        self.count = 0  # jobs cancelled
        self.waiting = 0  # workers whose answer or death it waits for
        self.reply = reply  # cancel_pending()'s caller waits for the count


class Cancels:
    """The supervisor's cancellations (see the module's docstring). Touched by its thread only."""

    def __init__(self, book: JobBook, timers: Timers, workers: dict[int, WorkerView]) -> None:
        self.book = book
        self.timers = timers  # Deadline.key timers are ours
        self.workers = workers
        self.replies: list[tuple[Future[int], int]] = []  # told after the next delivery
        self.open: list[Recall] = []  # recalls that wait for workers
        # slot -> the stopping recalls that wait for the worker's FLUSHED, then kill it; its
        # ("flush", slot) timer kills it if FLUSHED is late
        self.flushing: dict[int, list[Recall]] = {}

    # -- commands ----------------------------------------------------------------------------
    def cancel_pending(self, reply: Future[int]) -> Recall:
        """Cancel every job not started: queued, waiting for a retry, or in a mailbox."""
        return self._recall_unstarted(_everything, PENDING_CANCELLED, reply)

    def abandon(self, consumer: object) -> None:
        """An imap() closed before its end (its loop left early): nobody will read its
        results, so its jobs not started are cancelled, as concurrent.futures' map() does;
        running attempts finish. Without it, a loop that broke out early left thousands of
        read-ahead jobs for close() to wait for."""

        def wanted(block: Block) -> bool:
            return block.consumer is consumer

        self._recall_unstarted(wanted, ABANDONED, None)

    def submit(self, blocks: list[Block], deadline: Deadline) -> list[Block]:
        """Blocks of a call with a deadline: those to queue (none once it expired, then they
        are cancelled at once). Its timer starts with its first blocks."""
        if deadline.expired:
            self.book.cancel_submitted(blocks, deadline.cancel_error)
            return []
        if deadline.key not in self.timers:
            self.timers.schedule(deadline.at, deadline.key, deadline)
        return blocks

    def forget(self, deadline: Deadline) -> None:
        """The call ended before its deadline."""
        self.timers.cancel(deadline.key)

    # -- events ------------------------------------------------------------------------------
    def expire(self, deadline: Deadline) -> None:
        """The deadline's timer fired: cancel its call's jobs wherever they are."""
        deadline.expired = True

        def wanted(block: Block) -> bool:
            return block.tag is deadline

        error = deadline.cancel_error
        recall = Recall(wanted, error, stop_running=True)
        recall.count = self.book.cancel_queued(wanted, error)
        for w in list(self.workers.values()):
            self._reach(w, recall, ask=True)
        log.info(
            "a call's deadline of %g s passed: %d jobs cancelled", deadline.seconds, recall.count
        )
        self._settle(recall)

    def give_back(self, w: WorkerView, blocks: list[Block]) -> None:
        """Jobs ``w`` held and never started (a STEAL's answer, a retirement): cancelled if a
        recall wants them, else back to the queue, free."""
        if not w.recalls:
            self.book.requeue(blocks)
            return
        back = []
        for block in blocks:
            recall = _wanting(w.recalls, block)
            if recall is None:
                back.append(block)
            else:
                self.book.cancel_unstarted([block], recall.error)
                recall.count += block.size
        self.book.requeue(back)

    def returned(self, w: WorkerView, ids: list[int]) -> None:
        """RETURNED: the answer to one STEAL."""
        self.give_back(w, w.returned(set(ids)))
        for entry in list(w.recalls):
            if entry[0] is None:
                continue
            entry[0] -= 1
            if entry[0] <= 0:
                w.recalls.remove(entry)
                recall: Recall = entry[1]
                recall.waiting -= 1
                if recall.stop_running:  # what it still holds started meanwhile
                    self._reach(w, recall, ask=False)
                self._settle(recall)

    def died(self, w: WorkerView, job_id: int) -> None:
        """Before a dead worker's jobs are charged: the recalls waiting on it take what they
        want of its jobs (``job_id``: its progress slot when it died). It ran its jobs in the
        order of its ledger: those ahead of the running one had run (their results died with
        it), those behind it had not started."""
        if self.flushing.pop(w.slot, None) is not None:
            self.timers.cancel(("flush", w.slot))
        entries, w.recalls = w.recalls, []
        if not entries:
            return
        at = _running_at(w, job_id)
        for i, block in enumerate(list(w.held)):
            recall = _wanting(entries, block)
            if recall is None:
                continue
            if at is None or i > at:
                self.book.cancel_unstarted([block], recall.error)
            elif recall.stop_running:
                self.book.cancel_started([block], recall.error)
            else:
                continue  # it ran, or runs: charged as a death charges it
            w.remove(block)
            recall.count += block.size
        for _, recall in entries:
            recall.waiting -= 1
            self._settle(recall)

    def flushed(self, w: WorkerView) -> None:
        """FLUSHED from ``w``, or its grace timer fired: what it finished is in; stop it."""
        recalls = self.flushing.pop(w.slot, None)
        if recalls is None:
            return
        self.timers.cancel(("flush", w.slot))
        w.recalls = [e for e in w.recalls if not (e[0] is None and e[1] in recalls)]
        for recall in recalls:
            recall.waiting -= 1
            self._stop(w, recall)
            self._settle(recall)

    # -- the loop's bookkeeping ----------------------------------------------------------------
    def answer(self) -> None:
        """After a delivery: tell cancel_pending()'s callers how many jobs it cancelled."""
        replies, self.replies = self.replies, []
        for reply, n in replies:
            if not reply.done():
                reply.set_result(n)

    def close(self, leftovers: list[Future[int]]) -> None:
        """The loop has ended: every caller still waiting hears what was cancelled."""
        for recall in self.open:
            if recall.reply is not None:
                self.replies.append((recall.reply, recall.count))
        self.open = []
        self.replies += [(reply, 0) for reply in leftovers]
        self.answer()

    # -- inside ------------------------------------------------------------------------------
    def _recall_unstarted(
        self, wanted: Callable[[Block], bool], error: JobError, reply: Future[int] | None
    ) -> Recall:
        """Cancel the jobs ``wanted`` names that have not started: those queued now, and
        those in mailboxes once their workers hand them back."""
        recall = Recall(wanted, error, stop_running=False, reply=reply)
        recall.count = self.book.cancel_queued(wanted, error)
        for w in list(self.workers.values()):
            if any(map(wanted, w.held)):
                self._ask(w, recall)
        self._settle(recall)
        return recall

    def _ask(self, w: WorkerView, recall: Recall) -> None:
        """Ask ``w`` for its unstarted jobs; a worker that is dying answers by its death."""
        recall.waiting += 1
        if w.killed_for is None and w.steal():
            w.recalls.append([w.steals, recall])
        else:
            w.recalls.append([None, recall])

    def _reach(self, w: WorkerView, recall: Recall, *, ask: bool) -> None:
        """A stopping recall (a deadline) and the jobs of ``w``'s it wants. If ``w`` runs one
        of them (or ``ask`` is off), it is asked to FLUSH and then stopped (``_stop``); a
        worker that is dying, or cannot flush, is stopped now. Otherwise those that ran (ahead
        of the running job in its ledger; their results not sent yet) end now and those not
        started are asked back."""
        wanted = recall.wanted
        if not any(map(wanted, w.held)):
            return
        if w.slot in self.flushing:  # being stopped already: this recall waits for it too
            self._wait_flushed(w, recall)
            return
        at = _running_at(w, w.proc.running()[0])
        held = list(w.held)
        rest = held if at is None else held[at:]
        if not ask or w.killed_for is not None or wanted(rest[0]):
            if w.killed_for is None and w.proc.flushes and w.proc.send(FLUSH_MESSAGE):
                self.timers.schedule(time.monotonic() + FLUSH_GRACE, ("flush", w.slot), w)
                self._wait_flushed(w, recall)
            else:
                self._stop(w, recall)
            return
        for block in held[:at] if at is not None else []:  # they ran
            if wanted(block):
                w.remove(block)
                self.book.cancel_started([block], recall.error)
                recall.count += block.size
        if any(map(wanted, rest)):
            self._ask(w, recall)

    def _wait_flushed(self, w: WorkerView, recall: Recall) -> None:
        """``w`` gets no new jobs until it is stopped, and its death answers for it."""
        self.flushing.setdefault(w.slot, []).append(recall)
        recall.waiting += 1
        w.recalls.append([None, recall])

    def _stop(self, w: WorkerView, recall: Recall) -> None:
        """Kill ``w``, and end now the jobs of its that ``recall`` wants: its death need not be
        waited for, and results of theirs that it sends meanwhile are ignored."""
        wanted = recall.wanted
        if not any(map(wanted, w.held)):
            return  # it ended them all meanwhile
        at = _running_at(w, w.proc.running()[0])
        for i, block in enumerate(list(w.held)):
            if not wanted(block):
                continue
            w.remove(block)
            if at is not None and i <= at:
                self.book.cancel_started([block], recall.error)
            else:
                self.book.cancel_unstarted([block], recall.error)
            recall.count += block.size
        if w.killed_for is None:
            w.killed_for = (None, recall.error)  # charges no job: see watchdog.charge
            log.info("worker %s killed: %s", w.pid, recall.error.message)
            w.proc.kill()

    def _settle(self, recall: Recall) -> None:
        """Done once no worker is left to answer."""
        if recall.waiting:
            if recall not in self.open:
                self.open.append(recall)
            return
        if recall in self.open:
            self.open.remove(recall)
        if recall.reply is not None:
            self.replies.append((recall.reply, recall.count))


def _everything(block: Block) -> bool:
    return True


def _running_at(w: WorkerView, job_id: int) -> int | None:
    """Where in ``w``'s ledger the job ``job_id`` (its progress slot) is, given a block of its
    own; None when the slot names no held job."""
    found = None if job_id in UNSURE else find(w.held, job_id)
    if found is None:
        return None
    return w.held.index(w.isolate(*found))


def _wanting(entries: list[list[Any]], block: Block) -> Recall | None:
    """The first of a worker's recalls that wants ``block``."""
    for entry in entries:
        recall: Recall = entry[1]
        if recall.wanted(block):
            return recall
    return None
