"""Which worker gets which jobs next: batches off the scheduler's queue, sized by
sizing.BatchSizer, pickled and sent; and jobs taken back from workers that hold more than they
are running.

One pass (``dispatch``) fills the least-loaded workers first and prefetches one batch ahead;
when the queue runs dry while a worker idles, jobs waiting behind running ones are stolen back
(STEAL). What the queue hands out, and in which order, is the scheduler's (priorities, rate
admission); this module decides how much each worker takes and puts it on the wire. Taking jobs
back from a worker's mailbox (``take_back_prefetched``, ``_steal``) is the lever for any policy
that must reclaim them: a job never goes into a mailbox behind unstarted jobs of a lower
priority; those come back first (``_behind_lower``), so it waits only for running attempts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from typing import Any

from .jobs import Block, JobBook, count
from .ledger import WorkerView
from .messages import RUN, buffer_kinds, dumps, dumps_out_of_band
from .sizing import BatchSizer


class Dispatcher:
    def __init__(self, book: JobBook, sizer: BatchSizer, max_tasks: int | None) -> None:
        self.book = book
        self.sizer = sizer
        self.max_tasks = max_tasks

    def dispatch(self, candidates: Iterable[WorkerView], now: float) -> list[WorkerView]:
        """Send queued jobs to the workers that may take them; the workers sent to."""
        workers = [w for w in candidates if w.open]
        if not workers:
            return []
        queue = self.book.queue
        sizer = self.sizer
        sent: list[WorkerView] = []
        workers.sort(key=lambda w: w.holding)
        for w in workers:
            best = queue.head(now)  # what goes next to an idle worker
            if best is None:
                break
            if w.stealing:
                continue
            if best.priority > queue.floor and w.holding > 1 and _behind_lower(w, best.priority):
                w.steal()  # its prefetched jobs come back; the better one goes next
                continue
            head = queue.head(now, idle=False) if w.holding else best
            if head is None:
                continue  # a rate-limited job waits for an idle worker; this one is busy
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
            if n > 0 and self._send(w, n, now):
                sent.append(w)
        if not queue.unlimited:
            _steal(workers)
        return sent

    def take_back_prefetched(self, workers: Iterable[WorkerView]) -> None:
        """A drain waits for running attempts only: jobs waiting in a worker's mailbox come
        back (and are dropped with the queue)."""
        for w in workers:
            if w.holding > 1 and not w.stealing and w.killed_for is None:
                w.steal()

    def _send(self, w: WorkerView, n: int, now: float) -> bool:
        """Send ``w`` the next ``n`` jobs, or fewer; False when nothing went."""
        blocks = self.book.take(n, w.pid, now, not w.holding)
        if not blocks:
            return False  # their futures were cancelled
        pickled = self._pickler(w)
        try:
            blob, buffers = pickled(_data(blocks))
        except BaseException:  # a payload's __reduce__ may raise anything, SystemExit too
            blocks = self._drop_unpicklable(blocks, now)
            if not blocks:
                return False
            blob, buffers = pickled(_data(blocks))
        jobs = count(blocks)
        size = _message_bytes(blob, buffers)
        keep = self.sizer.oversized(jobs, size)
        if keep is not None:  # payloads grew past the estimate: a moderate message now
            blocks = self._keep(blocks, keep)
            jobs = keep
            blob, buffers = pickled(_data(blocks))
            size = _message_bytes(blob, buffers)
        self.sizer.sized(blocks[0].stage, size, jobs)
        runs = [(block.ids, block.stage) for block in blocks]
        header = dumps((RUN, runs, buffer_kinds(buffers)) if buffers else (RUN, runs))
        if not w.proc.send(header, blob, buffers):
            self.book.requeue(blocks)  # it died; its sentinel will tell
            return False
        w.sent(blocks)
        return True

    @staticmethod
    def _pickler(w: WorkerView) -> Callable[[Sequence[Any]], tuple[bytes, list[memoryview]]]:
        """How a message's payloads are pickled for ``w``: big buffers out of band where its
        backend sends them as they are (a local pipe), all in band elsewhere (Ray)."""
        if w.proc.sends_buffers:
            return dumps_out_of_band
        return _in_band

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


def _steal(workers: list[WorkerView]) -> None:
    """An idle worker and nothing queued: take back jobs waiting behind running ones."""
    if any(not w.holding for w in workers):
        for w in workers:
            if w.holding > 1 and not w.stealing:
                w.steal()


def _behind_lower(w: WorkerView, priority: int) -> bool:
    """Does ``w`` hold unstarted jobs of a lower priority than ``priority`` (all but the first
    job it holds, which runs)?"""
    held = w.held
    if held[0].size > 1 and held[0].priority < priority:
        return True
    return any(b.priority < priority for b in islice(held, 1, None))


def _data(blocks: list[Block]) -> Sequence[Any]:
    """What the jobs of one message run on, as one sequence."""
    if len(blocks) == 1:
        return blocks[0].data
    data: list[Any] = []
    for block in blocks:
        data += block.data
    return data


def _in_band(data: Sequence[Any]) -> tuple[bytes, list[memoryview]]:
    return dumps(data), []


def _message_bytes(blob: bytes, buffers: Sequence[memoryview]) -> int:
    """The payloads' bytes on the wire: their pickle and the buffers left out of it."""
    return len(blob) + sum(len(b) for b in buffers)


def _pickled_size(data: Any) -> int:
    try:
        return len(dumps(data))
    except BaseException:
        return 0  # _send reports it as the job's serialization error
