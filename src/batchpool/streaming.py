"""imap(): results streamed while the payloads are read lazily, a bounded window ahead, so
memory stays flat however long the input is."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

from .cancelling import Deadline
from .futures import Collector
from .jobs import Block
from .results import JobResult
from .sizing import MAX_BATCH, BatchSizer

# imap read-ahead per worker, in batches: one running, one queued, one being refilled
WINDOW_BATCHES = 3
# ... of at least this many jobs (batches of slow jobs are short), and at most MAX_BATCH
WINDOW_BATCH_FLOOR = 512
WINDOW_BYTES = 64 * 1024 * 1024  # imap read-ahead stops here (1 MB payloads!), beyond 2 per proc
SUBMIT_CHUNK = 1024  # jobs per block map() and imap() post: workers start on the first at once


def window(sizer: BatchSizer, procs: int) -> int:
    """How many jobs imap (and a pipeline's run) keeps in flight: full batches for every
    worker, as long as the supervisor measures them (thousands of tiny jobs, a few slow
    ones), and fewer when payloads or results are big (it measures their pickled size too)."""
    batch = max(WINDOW_BATCH_FLOOR, min(MAX_BATCH, sizer.jobs_per_message(0)))
    jobs = WINDOW_BATCHES * batch * procs
    per_job = sizer.wire_bytes(0)
    if per_job:
        jobs = min(jobs, WINDOW_BYTES // per_job)
    return max(jobs, 2 * procs)


class Stream:
    """One imap() call: ``post`` hands a block of jobs to the supervisor, ``room`` says how
    many jobs may be in flight now, ``collector`` brings their results back."""

    def __init__(
        self,
        source: Iterator[Any],
        post: Callable[[Block], None],
        room: Callable[[], int],
        collector: Collector,
        tag: Deadline | None,
        priority: int,
        abandon: Callable[[], None],
    ) -> None:
        """``abandon``: the stream was closed before its end (see Cancels.abandon)."""
        self.source = source
        self.post = post
        self.room = room
        self.collector = collector
        self.abandon = abandon
        self.tag = tag
        self.priority = priority
        self.next_index = 0  # of the source
        self.outstanding = 0  # submitted and not yet yielded
        self.exhausted = False
        # What the source raised: the items read before it still become jobs, and it is
        # raised to the caller after their results, as the builtin map() would.
        self.failure: Exception | None = None

    def _fill(self) -> None:
        """Read and submit payloads until the window is full or the source (or the
        deadline: items not read by then are no jobs) ends."""
        window = self.room()
        while not self.exhausted and self.outstanding < window:
            if self.tag is not None and self.tag.passed(time.monotonic()):
                self.exhausted = True
                return
            want = min(SUBMIT_CHUNK, window - self.outstanding)
            batch: list[Any] = []
            try:  # extend() keeps what it took before an error
                batch.extend(itertools.islice(self.source, want))
            except Exception as exc:
                self.failure = exc
            self.exhausted = len(batch) < want or self.failure is not None
            if batch:
                span = range(self.next_index, self.next_index + len(batch))
                self.post(Block(span, batch, self.collector, self.tag, self.priority))
                self.next_index += len(batch)
                self.outstanding += len(batch)

    def _end(self) -> None:
        if self.failure is not None:
            raise self.failure

    def ordered(self) -> Iterator[JobResult]:
        return self._abandoned_when_left(self._ordered())

    def unordered(self) -> Iterator[JobResult]:
        return self._abandoned_when_left(self._unordered())

    def _abandoned_when_left(self, stream: Iterator[JobResult]) -> Iterator[JobResult]:
        try:
            yield from stream
        finally:
            if self.outstanding:  # closed before its end: a loop left early
                self.abandon()

    def _unordered(self) -> Iterator[JobResult]:
        while True:
            self._fill()
            if not self.outstanding:
                self._end()
                return
            for _, run in self.collector.take():
                self.outstanding -= len(run)
                yield from run

    def _ordered(self) -> Iterator[JobResult]:
        held: dict[int, JobResult] = {}  # results waiting for an earlier index
        next_out = 0  # the index to yield next
        while True:
            self._fill()
            if not self.outstanding:
                self._end()
                return
            for indexes, run in self.collector.take():
                if isinstance(indexes, range) and indexes.start == next_out:
                    self.outstanding -= len(run)
                    yield from run  # the very results due next: no detour through held
                    next_out = indexes.stop
                else:
                    for result in run:
                        held[result.index] = result
                while next_out in held:
                    self.outstanding -= 1
                    yield held.pop(next_out)
                    next_out += 1
