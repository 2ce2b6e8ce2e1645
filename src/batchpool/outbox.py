"""Where jobs leave the supervisor: final results and cancellations handed to their consumers,
and the endings that settle many jobs at once (terminate, a failed loop, submits that came too
late).

Consumers run user code (future callbacks) that may call back into the pool or raise anything,
so every hand-over is guarded: one consumer's failure never loses another's results.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from .jobs import Block, Delivery, JobBook, count
from .results import JobError, JobResult

log = logging.getLogger("batchpool")


class Outbox:
    def __init__(self, book: JobBook) -> None:
        self.book = book
        self.cancelled: list[tuple[Block, JobError | None]] = []  # until the next deliver()

    def cancel(self, blocks: Iterable[Block]) -> None:
        """Tell the consumers of ``blocks`` (counted as cancelled already) at the next
        deliver()."""
        self.cancelled.extend((block, None) for block in blocks)

    def deliver(self) -> None:
        """Hand final results to their consumers, a Delivery each."""
        done, self.book.done = self.book.done, []
        cancelled, self.cancelled = self.cancelled, []
        for block, error in cancelled:
            try:
                for _ in range(block.size):  # once per job: a consumer may count them
                    block.consumer.cancel(block, error)
            except BaseException:
                log.exception("cancelling %r failed", block)
        by_consumer: dict[Any, list[tuple[Block, list[JobResult]]]] = {}
        for run in done:
            runs = by_consumer.get(run[0].consumer)
            if runs is None:
                by_consumer[run[0].consumer] = [run]
            else:
                runs.append(run)
        for consumer, runs in by_consumer.items():
            try:
                consumer.deliver(Delivery(runs))
            except BaseException:
                log.exception("delivering results failed")

    def fail(self, blocks: list[Block], error: JobError) -> None:
        """Fail ``blocks`` now, outside the book: the pool broke."""
        for block in blocks:
            try:
                self.book.stages[block.stage].failed += block.size
                block.consumer.deliver(Delivery([(block, block.failures(error))]))
            except BaseException:
                log.exception("could not fail %r", block)

    # -- endings -------------------------------------------------------------------------------
    def terminate(self, held: list[Block]) -> None:
        """Cancel every unfinished job: ``held``, the jobs the killed workers held, and the
        queue."""
        self.book.cancel_held(held)
        held.extend(self.book.abandon())
        self.cancel(held)

    def fail_all(self, held: list[Block], error: JobError) -> None:
        """The loop itself failed: results made before the failure go out, then every job it
        knows of fails, so that nothing waits on a loop that is gone."""
        held.extend(self.book.queue.drain())
        self.book.sent = 0
        try:
            self.deliver()
        except BaseException:
            log.exception("delivering results failed")
        self.fail(held, error)

    def settle_leftovers(self, blocks: list[Block], broken: JobError | None) -> None:
        """Jobs submitted while the loop was ending: failed if the pool broke, else
        cancelled; never left waiting."""
        if not blocks:
            return
        self.book.stages[0].submitted += count(blocks)
        if broken is not None:
            self.fail(blocks, broken)
        else:
            self.book.cancel_held(blocks, sent=False)
            self.cancel(blocks)
            self.deliver()
