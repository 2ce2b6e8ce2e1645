"""Jobs, in blocks, and the one place where a job changes state.

A block is a run of jobs that share their way through the pool: one stage, one attempt count,
one consumer. A map() enters as a few blocks; a worker is sent slices of them; a batch that
succeeds completes as one, its JobResults built in one pass. A job gets a block of its own only
where its way parts from its neighbours': it failed (a crash or a timeout charges exactly the
job that was running, its batch-mates go back to the queue uncharged), it must run alone, or it
has a Future. So the supervisor pays per block, not per job, on the path that every job takes.

The states are where a block is, not a field: the ready queue, a worker's ledger, the retry
timers, or delivered.

    submit --> QUEUED --dispatch--> SENT --result ok--------------------> (next stage) or DONE
                 ^                    |--failed, retries left--> WAITING --due--> QUEUED (front)
                 |                    |--failed, final------------------------------> DONE
                 +---- requeue -------+   (worker died or retired before starting it: free)

A multi-stage block re-enters QUEUED for its next stage with the previous stage's values as its
``data``; ``payload`` stays the source payloads that the final JobResults report, and their
``attempts`` add up every stage's. Counters are kept per stage (StageCount); Metrics sums them
into per-job counts.

A block's ``tag`` (a futures.JobFuture, or a cancelling.Deadline shared by the blocks of one call)
is asked at each dispatch whether its jobs may still start (``claim``), and told when they are
back in the queue (``release``: a retry waits, or a worker handed them back unstarted). A tag
that refuses has its jobs dropped at dispatch, counted as cancelled: a Future resolved itself
(its ``cancel_error`` is None); a Deadline's jobs end as "cancelled" results with its error.
Cancelling takes jobs out wherever they are not started: the queue and the retries
(``cancel_queued``), a worker's mailbox (``cancel_unstarted``), and, for a deadline, the
attempts that started (``cancel_started``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain, repeat
from operator import attrgetter
from typing import Any

from .messages import ERROR, OK, SPLIT, UNPICKLABLE, error_tuple
from .results import (
    KIND_CRASH,
    KIND_ERROR,
    KIND_SERIALIZATION,
    KIND_TIMEOUT,
    JobError,
    JobResult,
    new_result,
)
from .retry import backoff_delay, should_retry
from .scheduler import Scheduler
from .task import Policy

log = logging.getLogger("batchpool")
_new = object.__new__
_NO_IDS = range(0)
_size = attrgetter("size")


class Block:
    """Jobs that travel together (see the module's docstring); often just one."""

    __slots__ = (
        "size",
        "ids",
        "index",
        "payload",
        "data",
        "stage",
        "attempts",
        "prior",
        "consumer",
        "tag",
        "worker",
        "solo",
        "priority",
    )

    def __init__(
        self,
        index: Sequence[int],
        payload: Sequence[Any],
        consumer: Any,
        tag: Any = None,
        priority: int = 0,
    ) -> None:
        self.size = len(payload)  # jobs in the block
        self.ids = _NO_IDS  # consecutive, given at the first dispatch: only sent jobs need any
        self.index = index  # each job's JobResult.index (a range, for a map's chunk)
        self.payload = payload  # as the source gave them
        self.data = payload  # what the current stage runs on; emptied once it is done
        self.stage = 0
        self.attempts = 0  # in this stage; every job of a block has made as many
        self.prior = 0  # attempts made in the stages before this one
        self.consumer = consumer  # gets the final JobResults (see outbox.Outbox.deliver)
        self.tag = tag  # a one-job block's handle for its consumer (a Future, say)
        self.worker: int | None = None  # pid of the worker of the latest attempt
        self.solo = False  # a one-job block that must travel alone (see messages.SPLIT)
        self.priority = priority  # higher runs first (scheduler.py); a retry keeps it

    def __repr__(self) -> str:
        return f"<Block of {self.size} at index {self.index[0]}, stage {self.stage}>"

    def part(self, lo: int, hi: int) -> Block:
        """Jobs ``lo`` to ``hi - 1`` as a block of their own; this one is left as it is."""
        block = _new(Block)
        block.size = hi - lo
        block.ids = self.ids[lo:hi]
        block.index = self.index[lo:hi]
        block.payload = self.payload[lo:hi]
        block.data = block.payload if self.data is self.payload else self.data[lo:hi]
        block.stage = self.stage
        block.attempts = self.attempts
        block.prior = self.prior
        block.consumer = self.consumer
        block.tag = self.tag
        block.worker = self.worker
        block.solo = self.solo
        block.priority = self.priority
        return block

    def cut(self, k: int) -> Block:
        """Take the first ``k`` jobs out of this block, as a block of their own."""
        head = self.part(0, k)
        self.size -= k
        self.ids = self.ids[k:]
        self.index = self.index[k:]
        shared = self.data is self.payload
        self.payload = self.payload[k:]
        self.data = self.payload if shared else self.data[k:]
        return head

    def singles(self) -> list[Block]:
        """One block per job."""
        if self.size == 1:
            return [self]
        return [self.part(i, i + 1) for i in range(self.size)]

    def results(
        self, values: Sequence[Any], error: JobError | None, elapsed: Sequence[float]
    ) -> list[JobResult]:
        """The final JobResults of every job of the block, in one pass."""
        if self.size == 1:  # a job of its own (a Future's, a failure): no iterators to set up
            return [self.result(values[0], error, elapsed[0])]
        attempts = self.prior + self.attempts
        return list(
            map(
                new_result,
                self.index,
                self.payload,
                values,
                repeat(error),
                repeat(attempts),
                elapsed,
                repeat(self.worker),
            )
        )

    def result(self, value: Any, error: JobError | None, elapsed: float) -> JobResult:
        """The final JobResult of a one-job block."""
        attempts = self.prior + self.attempts
        return new_result(
            self.index[0], self.payload[0], value, error, attempts, elapsed, self.worker
        )

    def failures(self, error: JobError) -> list[JobResult]:
        """The final JobResults of jobs that fail with ``error`` without running."""
        return self.results([None] * self.size, error, [0.0] * self.size)


Job = Block  # one job is a block of one; the name its consumers annotate with


class Delivery:
    """Final results for one consumer (see outbox.Outbox.deliver). Iterated: (block, result)
    pairs, each made in the place of the one before. ``runs``: the same results as they were
    built, (block, results) per block, for a consumer that takes them whole."""

    __slots__ = ("runs",)

    def __init__(self, runs: list[tuple[Block, list[JobResult]]]) -> None:
        self.runs = runs

    def __iter__(self) -> Iterator[tuple[Block, JobResult]]:
        return chain.from_iterable(zip(repeat(block), results) for block, results in self.runs)


Counts = tuple[int, int, int, int, int, int, int, int]


class StageCount:
    """One stage's counters (see results.StageMetrics)."""

    __slots__ = (
        "submitted",
        "started",
        "succeeded",
        "failed",
        "cancelled",
        "retried",
        "timed_out",
        "crashed",
    )

    def __init__(self) -> None:
        self.submitted = self.started = self.succeeded = self.failed = self.cancelled = 0
        self.retried = self.timed_out = self.crashed = 0

    def counts(self) -> Counts:
        """In results.StageMetrics' field order."""
        return (
            self.submitted,
            self.started,
            self.succeeded,
            self.failed,
            self.cancelled,
            self.retried,
            self.timed_out,
            self.crashed,
        )


class JobBook:
    """Counters and outcomes; the queue itself is the scheduler's. No processes, no clock of
    its own."""

    def __init__(self, policies: list[Policy], rand: Callable[[], float]) -> None:
        self.policies = policies
        self.rand = rand
        self.queue: Scheduler[Block] = Scheduler([p.rate for p in policies])
        self.sent = 0  # jobs in workers' hands
        self.next_id = 0  # job ids are unique in a pool, given out at first dispatch
        # final results not yet delivered, with the block they belong to
        self.done: list[tuple[Block, list[JobResult]]] = []
        self.stages = [StageCount() for _ in policies]

    # -- entry ---------------------------------------------------------------------------
    def add(self, blocks: list[Block]) -> None:
        self.stages[0].submitted += count(blocks)
        self.queue.add(coalesce(blocks))

    # -- dispatch ------------------------------------------------------------------------
    def take(self, n: int, pid: int, now: float, idle: bool) -> list[Block]:
        """Up to n jobs for one message to worker ``pid`` (``idle``: it runs nothing), as the
        scheduler picks them at ``now``. Jobs whose tag refuses (a Future cancelled, a deadline
        passed) are dropped here instead; the others' futures become RUNNING."""
        started = []
        jobs = later = 0  # later: of them, jobs of stages after the first
        for block in self.queue.take(n, now, idle):
            tag = block.tag
            if tag is not None and not tag.claim():
                if tag.cancel_error is None:  # a Future, resolved by its owner
                    self._cancelled(block)
                else:
                    self.cancel_final([block], tag.cancel_error)
                continue
            k = block.size
            if not block.ids:
                block.ids = range(self.next_id, self.next_id + k)
                self.next_id += k
            block.attempts += 1
            block.worker = pid
            jobs += k
            if block.stage:
                self.stages[block.stage].started += k
                later += k
            started.append(block)
        self.sent += jobs
        self.stages[0].started += jobs - later
        return started

    def requeue(self, blocks: list[Block], solo: bool = False) -> None:
        """Jobs a worker held but never started (or must run alone): back to the front, no
        attempt charged."""
        for block in blocks:
            k = block.size
            block.attempts -= 1
            self.stages[block.stage].started -= k
            self.sent -= k
            if block.tag is not None:
                block.tag.release()
        if solo:
            blocks = [single for block in blocks for single in block.singles()]
            for single in blocks:
                single.solo = True
        self.queue.push_front(blocks)

    def cancel(self, block: Block) -> bool:
        """Drop a block whose Future was cancelled, queued or waiting for a retry; False if it
        is in neither (taken already, or dropped at dispatch)."""
        if not self.queue.remove(block):
            return False
        self._cancelled(block)
        return True

    def cancel_queued(self, wanted: Callable[[Block], bool], error: JobError) -> int:
        """Cancel the jobs ``wanted`` names that are queued or wait for a retry, each with a
        final result carrying ``error``; how many."""
        blocks = self.queue.remove_where(wanted)
        self.cancel_final(blocks, error)
        return count(blocks)

    def cancel_unstarted(self, blocks: list[Block], error: JobError) -> None:
        """Jobs a worker held and never started, cancelled: the attempt they were sent for is
        given back first."""
        for block in blocks:
            k = block.size
            block.attempts -= 1
            self.stages[block.stage].started -= k
            self.sent -= k
        self.cancel_final(blocks, error)

    def cancel_started(self, blocks: list[Block], error: JobError) -> None:
        """Jobs a worker held that had started, cancelled (a deadline: the attempt is cut
        short, or ran and its result is lost with the worker): their attempts count."""
        for block in blocks:
            self.sent -= block.size
        self.cancel_final(blocks, error)

    def cancel_submitted(self, blocks: list[Block], error: JobError) -> None:
        """Jobs that come in cancelled (a call's deadline passed while it submitted them)."""
        self.stages[0].submitted += count(blocks)
        self.cancel_final(blocks, error)

    def cancel_final(self, blocks: list[Block], error: JobError) -> None:
        """Jobs in no queue and no worker's hands, cancelled: final results with ``error``."""
        for block in blocks:
            k = block.size
            self.stages[block.stage].cancelled += k
            self._final(block, [None] * k, error, [0.0] * k)

    def cancel_held(self, blocks: list[Block], *, sent: bool = True) -> None:
        """Count as cancelled jobs that no queue holds: taken by killed workers (``sent``),
        or never added."""
        for block in blocks:
            self._cancelled(block)
            if sent:
                self.sent -= block.size

    def _cancelled(self, block: Block) -> None:
        self.stages[block.stage].cancelled += block.size
        block.data = ()

    # -- outcomes ------------------------------------------------------------------------
    def complete(self, block: Block, values: list[Any], elapsed: list[float]) -> None:
        """Every job of the block succeeded: on to the next stage together, or done."""
        k = block.size
        self.sent -= k
        self.stages[block.stage].succeeded += k
        if block.stage + 1 < len(self.policies):
            block.stage += 1
            block.priority = self.policies[block.stage].priority  # that task's, in a pipeline
            block.data = values
            block.prior += block.attempts
            block.attempts = 0
            self.stages[block.stage].submitted += k
            self.queue.push_front([block])  # finish old jobs first: keeps ordered streams moving
            return
        self._final(block, values, None, elapsed)

    def complete_all(self, blocks: list[Block], values: list[Any], elapsed: list[float]) -> None:
        """complete() for each block of an answer in which every job succeeded."""
        if len(blocks) == 1:
            self.complete(blocks[0], values, elapsed)
            return
        last = len(self.policies) - 1
        pos = 0
        for block in blocks:
            k = block.size
            if k == 1 and block.stage == last:  # a Future's job, say: no slices, one result
                self.sent -= 1
                self.stages[last].succeeded += 1
                block.data = ()
                self.done.append((block, [block.result(values[pos], None, elapsed[pos])]))
            else:
                self.complete(block, values[pos : pos + k], elapsed[pos : pos + k])
            pos += k

    def attempt_failed(
        self, job: Block, error: JobError, *, retryable: bool, elapsed: float, now: float
    ) -> None:
        """The attempt of a one-job block failed: retried later, or its final result."""
        self.sent -= 1
        count = self.stages[job.stage]
        if error.kind == KIND_TIMEOUT:
            count.timed_out += 1
        elif error.kind == KIND_CRASH:
            count.crashed += 1
        policy = self.policies[job.stage]
        if should_retry(job.attempts, policy.retries, retryable):
            count.retried += 1
            delay = backoff_delay(
                job.attempts, policy.backoff, policy.max_backoff, policy.jitter, self.rand
            )
            self.queue.defer(job, now + delay)
            if job.tag is not None:
                job.tag.release()
            log.info(
                "job %s: attempt %d failed (%s: %s); retry in %.2f s",
                job.index[0],
                job.attempts,
                error.type,
                error.message,
                delay,
            )
            return
        count.failed += 1
        log.info("job %s: failed for good (%s: %s)", job.index[0], error.type, error.message)
        self._final(job, [None], error, [elapsed])

    def settle(
        self,
        blocks: list[Block | None],
        outcomes: list[int],
        elapsed: list[float],
        values: list[Any],
        now: float,
    ) -> int:
        """The outcomes of one answered batch (``blocks`` in order; None for a job already
        charged elsewhere); returns how many jobs were split off to run alone."""
        split = 0
        pos = 0
        for block in blocks:
            if block is None:
                pos += 1
                continue
            end = pos + block.size
            split += self._settle(block, outcomes[pos:end], elapsed[pos:end], values[pos:end], now)
            pos = end
        return split

    def _settle(
        self, block: Block, outcomes: list[int], elapsed: list[float], values: list[Any], now: float
    ) -> int:
        """One block's outcomes: the runs that succeeded complete together, every other job
        on its own."""
        split = 0
        lo = 0
        for i, outcome in enumerate(outcomes):
            if outcome == OK:
                continue
            if lo < i:
                self.complete(block.part(lo, i), values[lo:i], elapsed[lo:i])
            lo = i + 1
            job = block if block.size == 1 else block.part(i, lo)  # a Future's knows its own
            if outcome == SPLIT:
                split += 1
                self.requeue([job], solo=True)
                continue
            kind = KIND_SERIALIZATION if outcome == UNPICKLABLE else KIND_ERROR
            error = JobError(kind, *values[i])
            retryable = outcome == ERROR
            self.attempt_failed(job, error, retryable=retryable, elapsed=elapsed[i], now=now)
        if lo == 0:
            self.complete(block, values, elapsed)
        elif lo < len(outcomes):
            self.complete(block.part(lo, len(outcomes)), values[lo:], elapsed[lo:])
        return split

    def unloadable(self, blocks: list[Block], exc: BaseException, now: float) -> None:
        """Their values pickled in the worker but do not load here: alone, the job fails
        (never retried); in a batch, each runs alone to find which, no attempt charged."""
        if count(blocks) == 1:
            error = error_from(KIND_SERIALIZATION, exc)
            self.attempt_failed(blocks[0], error, retryable=False, elapsed=0.0, now=now)
        else:
            self.requeue(blocks, solo=True)

    def fail_unsent(self, error: JobError) -> None:
        """Fail every job not in a worker's hands (the pool cannot start workers)."""
        for block in self.queue.drain():
            # The attempt it was queued for ends here, failed: counted like one that ran.
            block.attempts += 1
            stage = self.stages[block.stage]
            stage.started += block.size
            stage.failed += block.size
            block.data = ()
            self.done.append((block, block.failures(error)))

    def abandon(self) -> list[Block]:
        """Every unfinished job not in a worker's hands, counted as cancelled: for a drain or
        terminate()."""
        blocks = self.queue.drain()
        for block in blocks:
            self._cancelled(block)
        return blocks

    def _final(
        self, block: Block, values: Sequence[Any], error: JobError | None, elapsed: Sequence[float]
    ) -> None:
        block.data = ()
        self.done.append((block, block.results(values, error, elapsed)))

    @property
    def unfinished(self) -> int:
        return len(self.queue) + self.queue.waiting + self.sent

    @property
    def queued(self) -> int:
        return len(self.queue) + self.queue.waiting


def coalesce(blocks: list[Block]) -> list[Block]:
    """Each run of one-job blocks that share a consumer and a priority and have no Future, as
    one block: a caller that makes its jobs one at a time (a pipeline reading its source) still
    has them travel, complete and come back in blocks."""
    out: list[Block] = []
    run: list[Block] = []
    for block in blocks:
        loose = block.size == 1 and block.tag is None
        if loose and (
            not run or (block.consumer is run[0].consumer and block.priority == run[0].priority)
        ):
            run.append(block)
            continue
        if run:
            out.append(_joined(run))
            run = []
        if loose:
            run.append(block)
        else:
            out.append(block)
    if run:
        out.append(_joined(run))
    return out


def _joined(run: list[Block]) -> Block:
    if len(run) == 1:
        return run[0]
    first = run[0]
    index = [b.index[0] for b in run]
    return Block(index, [b.payload[0] for b in run], first.consumer, priority=first.priority)


def count(blocks: Iterable[Block]) -> int:
    """Jobs in ``blocks``."""
    return sum(map(_size, blocks))


def error_from(kind: str, exc: BaseException) -> JobError:
    return JobError(kind, *error_tuple(exc))
