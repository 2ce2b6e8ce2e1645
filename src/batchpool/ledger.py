"""The supervisor's view of one worker: the jobs it holds, in the order it runs them, and who
is to blame when it dies or hangs.

A worker answers its jobs in the order they were sent, so the ledger is a queue of blocks
(jobs.Block): an answer takes whole blocks from the front, and cuts the last one where the
answer ends; a STEAL's answer takes out the jobs it handed back; what is left when the worker is
gone goes back to the scheduler. Attribution (``attribute``) is a pure function of the ledger
and the worker's progress slot; ``WorkerView.isolate`` then gives the job it names a block of
its own, so that exactly that job is charged and its batch-mates go back uncharged.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from .jobs import Block, count
from .messages import FLUSHING, IDLE, STEAL, UNPACKING, dumps
from .results import JobError

UNSURE = (IDLE, FLUSHING, UNPACKING)  # slot values that name no single job
STEAL_MESSAGE = dumps((STEAL,))


class WorkerView:
    """What the supervisor knows of one worker process."""

    __slots__ = (
        "proc",
        "slot",
        "pid",
        "ready",
        "held",
        "holding",
        "stealing",
        "steals",
        "recalls",
        "assigned",
        "jobs",
        "busy",
        "rss",
        "retiring",
        "stopping",
        "killed_for",
        "start_error",
        "polled_write",
        "idle_since",
    )

    def __init__(self, proc: Any) -> None:
        self.proc = proc
        self.slot: int = proc.slot
        self.pid: int = proc.pid
        self.ready = False
        self.held: deque[Block] = deque()  # sent and not answered, in the order it runs them
        self.holding = 0  # jobs in them
        self.stealing = False  # a STEAL is on its way; no new jobs until a result comes
        self.steals = 0  # STEALs sent and not answered (each gets one RETURNED, in order)
        # cancellings.Recall entries waiting on this worker: [answers to wait for, or None
        # for its death; the recall]. It gets no new jobs meanwhile.
        self.recalls: list[list[Any]] = []
        self.assigned = 0  # jobs sent and not handed back (max_tasks_per_worker)
        self.jobs = 0  # jobs it answered
        self.busy = 0.0  # seconds in run()
        self.rss = 0
        self.retiring = False
        self.stopping = False
        self.killed_for: tuple[Block | None, JobError] | None = None  # a timeout kill
        self.start_error: JobError | None = None  # what START_FAILED reported
        self.polled_write = False  # its channel is watched for room to write
        self.idle_since = 0.0  # when it last ran out of jobs (scaling reads it)

    @property
    def open(self) -> bool:
        """It may be sent jobs."""
        return (
            self.ready
            and not self.retiring
            and not self.stopping
            and self.killed_for is None
            and not self.recalls
        )

    def steal(self) -> bool:
        """Ask for the jobs it has not started back (answered by RETURNED); False if it is
        gone."""
        self.stealing = True
        if not self.proc.send(STEAL_MESSAGE):
            return False
        self.steals += 1
        return True

    def sent(self, blocks: list[Block]) -> None:
        k = count(blocks)
        self.held.extend(blocks)
        self.holding += k
        self.assigned += k

    def answered(self, ids: list[int]) -> list[Block | None]:
        """Take the answered jobs off the ledger, as blocks in the order of ``ids``; None
        stands for an id it no longer holds (a job charged to a timeout kill already).

        A worker answers the jobs it holds in the order it was sent them, and a block's ids
        are consecutive: an answer that starts and ends where the front of the ledger does
        is that front, whatever its length, and takes no step per job."""
        held = self.held
        n = len(ids)
        blocks: list[Block | None] = []
        pos = 0
        while pos < n and held:
            block = held[0]
            k = min(block.size, n - pos)
            if ids[pos] != block.ids[0] or ids[pos + k - 1] != block.ids[k - 1]:
                break
            blocks.append(held.popleft() if k == block.size else block.cut(k))
            pos += k
        self.holding -= pos
        for job_id in ids[pos:]:  # only after a kill or a steal took jobs out of order
            blocks.append(self._take_out(job_id))
        return blocks

    def _take_out(self, job_id: int) -> Block | None:
        found = find(self.held, job_id)
        if found is None:
            return None
        job = self.isolate(*found)
        self.held.remove(job)
        self.holding -= 1
        return job

    def isolate(self, block: Block, pos: int) -> Block:
        """Give the job at ``pos`` of a held block a block of its own, in its place in the
        ledger; return it."""
        if block.size == 1:
            return block
        held = self.held
        at = held.index(block)
        job = block.part(pos, pos + 1)
        pieces = [block.part(0, pos), job, block.part(pos + 1, block.size)]
        del held[at]
        for piece in reversed(pieces):
            if piece.size:
                held.insert(at, piece)
        return job

    def returned(self, ids: set[int]) -> list[Block]:
        """The jobs a STEAL handed back: off the ledger, and off the worker's quota."""
        self.steals = max(0, self.steals - 1)
        back: list[Block] = []
        kept: deque[Block] = deque()
        for block in self.held:
            marks = [job_id in ids for job_id in block.ids]
            if not any(marks):
                kept.append(block)
            elif all(marks):
                back.append(block)
            else:
                lo = 0
                for i in range(1, len(marks) + 1):
                    if i == len(marks) or marks[i] != marks[lo]:
                        (back if marks[lo] else kept).append(block.part(lo, i))
                        lo = i
        k = count(back)
        self.held = kept
        self.holding -= k
        self.assigned -= k
        if not kept:
            self.stealing = False  # it gave back everything: no result will come to clear it
        return back

    def remove(self, block: Block) -> None:
        """A held block taken off the ledger (a cancellation)."""
        self.held.remove(block)
        self.holding -= block.size

    def take_all(self) -> list[Block]:
        blocks = list(self.held)
        self.held.clear()
        self.holding = 0
        return blocks


def attribute(held: deque[Block], job_id: int) -> tuple[tuple[Block, int] | None, bool]:
    """Who a worker died (or hung) for: ``((block, position), False)`` for the job to charge,
    or ``(None, True)`` when several held jobs are candidates and each must run alone to find
    out (no attempt charged), or ``(None, False)`` when it held nothing.

    The progress slot names the running job exactly. Between jobs, while unpickling a batch
    or while pickling a batch of results, it names none: then a job already isolated (solo)
    is the one, and so is a lone job whose results were being pickled.
    """
    if job_id not in UNSURE:
        return find(held, job_id), False
    if not held:
        return None, False
    head = held[0]
    if head.solo or (job_id == FLUSHING and len(held) == 1 and head.size == 1):
        return (head, 0), False
    return None, True


def find(held: deque[Block], job_id: int) -> tuple[Block, int] | None:
    """The held block with this job, and the job's position in it."""
    for block in held:
        if job_id in block.ids:
            return block, block.ids.index(job_id)
    return None
