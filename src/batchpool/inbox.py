"""What workers tell the supervisor, each message handed to the owner of what it changes.

    RESULTS       answered jobs: completed together (jobs.JobBook), or settled one by one where
                  an attempt failed; timed for batch sizing and the p50/p95 sample; a retiring
                  worker's unstarted jobs go back (or to a cancellation that wants them)
    STARTED       a worker the backend started late (a Ray actor) has a process now
                  (workforce.py)
    READY         a worker finished setup() (workforce.py; scaler.py counts it)
    RETURNED      the answer to a STEAL: unstarted jobs, back to the queue, free, unless a
                  cancellation wants them (cancelling.py)
    START_FAILED  why setup() failed, for the failed start its death will report
    EXITING       its peak RSS, so runs shorter than an RSS sample see it
    FLUSHED       the answer to a deadline's FLUSH: the worker can be stopped now

A frame that does not unpickle is dropped (a broken writer's); its worker's death, if it comes,
reports itself. Touched by the supervisor's thread only.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from .cancelling import Cancels
from .jobs import Block, JobBook
from .ledger import WorkerView
from .messages import (
    EXITING,
    FLUSHED,
    OK,
    READY,
    RESULTS,
    RETURNED,
    SPLIT,
    START_FAILED,
    STARTED,
    Layout,
    loads,
    results_values,
)
from .results import KIND_ERROR, JobError
from .sampling import Reservoir
from .scaler import Scaler
from .sizing import BatchSizer
from .watch import Watch
from .workforce import Workforce

log = logging.getLogger("batchpool")


class Inbox:
    def __init__(
        self,
        book: JobBook,
        sizer: BatchSizer,
        samples: list[Reservoir],
        workforce: Workforce,
        cancels: Cancels,
        scaler: Scaler | None,
        watch: Watch[WorkerView],
    ) -> None:
        self.book = book
        self.sizer = sizer
        self.samples = samples  # attempt times per stage
        self.workforce = workforce
        self.cancels = cancels
        self.scaler = scaler
        self.watch = watch

    def read(self, w: WorkerView, now: float) -> None:
        """Every whole message waiting on ``w``'s channel."""
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
            self.on_message(w, message, frame, now)

    def on_message(
        self, w: WorkerView, message: tuple[Any, ...], frame: bytes | bytearray, now: float
    ) -> None:
        tag = message[0]
        if tag == RESULTS:
            _, ids, outcomes, elapsed, blob, retiring = message
            self.on_results(w, ids, outcomes, elapsed, blob, frame, now)
            if retiring:
                log.debug("worker %s retires (%s)", w.pid, retiring)
                w.retiring = True
                self.cancels.give_back(w, w.take_all())
            if not w.holding:
                self._idle(w, now)
        elif tag == READY:
            self.workforce.ready(w, now)
            if self.scaler is not None:
                self.scaler.ready(w)
                self.scaler.idle(now)
        elif tag == RETURNED:
            self.cancels.returned(w, message[1])
            if not w.holding:
                self._idle(w, now)
        elif tag == START_FAILED:
            w.start_error = JobError(KIND_ERROR, *message[1])
        elif tag == STARTED:
            self.workforce.started(w, message[1], now)
        elif tag == EXITING:
            self.workforce.exiting(message[1])
        elif tag == FLUSHED:
            self.cancels.flushed(w)

    def on_results(
        self,
        w: WorkerView,
        ids: list[int],
        outcomes: list[int],
        elapsed: list[float],
        blob: bytes | Layout,
        frame: bytes | bytearray,
        now: float,
    ) -> None:
        """``blob``: the values' pickle, or where it lies in ``frame`` with the buffers left
        out of it (messages.results_frame: a local worker's)."""
        blocks = w.answered(ids)
        if not blocks:
            return
        w.stealing = False
        try:
            if isinstance(blob, tuple):
                view, buffers = results_values(frame, blob)
                values = loads(view, buffers=buffers)
            else:
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
            self.sizer.answered(stage, len(frame), len(ids))

    def _idle(self, w: WorkerView, now: float) -> None:
        self.workforce.idle(w, now)
        if self.scaler is not None:
            self.scaler.idle(now)
