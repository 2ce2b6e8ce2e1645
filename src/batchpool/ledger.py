"""The supervisor's view of one worker: the jobs it holds, in the order it runs them, and who
is to blame when it dies or hangs.

A worker answers its jobs in the order they were sent, so the ledger is a queue: answers take
from the front (one pass for a whole batch), a STEAL's answer takes out the jobs it handed
back, and what is left when the worker is gone goes back to the scheduler. Attribution
(``attribute``) is a pure function of the ledger and the worker's progress slot.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from .messages import FLUSHING, IDLE, UNPACKING
from .results import JobError

UNSURE = (IDLE, FLUSHING, UNPACKING)  # slot values that name no single job


class WorkerView:
    """What the supervisor knows of one worker process."""

    __slots__ = (
        "proc",
        "slot",
        "pid",
        "ready",
        "held",
        "stealing",
        "assigned",
        "jobs",
        "busy",
        "rss",
        "retiring",
        "stopping",
        "killed_for",
        "start_error",
        "polled_write",
    )

    def __init__(self, proc: Any) -> None:
        self.proc = proc
        self.slot: int = proc.slot
        self.pid: int = proc.pid
        self.ready = False
        self.held: deque = deque()  # jobs sent and not answered, in the order it runs them
        self.stealing = False  # a STEAL is on its way; no new jobs until a result comes
        self.assigned = 0  # jobs sent and not handed back (max_tasks_per_worker)
        self.jobs = 0  # jobs it answered
        self.busy = 0.0  # seconds in run()
        self.rss = 0
        self.retiring = False
        self.stopping = False
        self.killed_for: tuple[Any, JobError] | None = None  # a timeout kill: (job, error)
        self.start_error: JobError | None = None  # what START_FAILED reported
        self.polled_write = False  # its channel is watched for room to write

    @property
    def open(self) -> bool:
        """It may be sent jobs."""
        return self.ready and not self.retiring and not self.stopping and self.killed_for is None

    def sent(self, jobs: list) -> None:
        self.held.extend(jobs)
        self.assigned += len(jobs)

    def answered(self, ids: list[int]) -> list:
        """Take the answered jobs off the ledger; None for an id it no longer holds (a job
        charged to a timeout kill already)."""
        front = self._front(ids)
        if front is not None:
            return front
        held = self.held
        jobs: list = []
        for job_id in ids:
            if held and held[0].id == job_id:
                jobs.append(held.popleft())
            else:
                job = find(held, job_id)
                if job is not None:
                    held.remove(job)
                jobs.append(job)
        return jobs

    def _front(self, ids: list[int]) -> list | None:
        """The first len(ids) jobs, if they are exactly ``ids`` (a whole batch answered in
        order, nothing lost to a kill or a steal): one pass instead of a search per id."""
        held = self.held
        k = len(ids)
        if not k or len(held) < k or held[k - 1].id != ids[-1]:
            return None
        popleft = held.popleft
        front = [popleft() for _ in range(k)]
        if [job.id for job in front] == ids:
            return front
        held.extendleft(reversed(front))
        return None

    def returned(self, ids: set[int]) -> list:
        """The jobs a STEAL handed back: off the ledger, and off the worker's quota."""
        back = [job for job in self.held if job.id in ids]
        for job in back:
            self.held.remove(job)
        self.assigned -= len(back)
        if not self.held:
            self.stealing = False  # it gave back everything: no result will come to clear it
        return back

    def take_all(self) -> list:
        jobs = list(self.held)
        self.held.clear()
        return jobs


def attribute(held: deque, job_id: int) -> tuple[Any, bool]:
    """Who a worker died (or hung) for: ``(job, False)``, or ``(None, True)`` when several
    held jobs are candidates and each must run alone to find out (no attempt charged), or
    ``(None, False)`` when it held nothing.

    The progress slot names the running job exactly. Between jobs, while unpickling a batch
    or while pickling a batch of results, it names none: then a job already isolated (solo)
    is the one, and so is a lone job whose results were being pickled.
    """
    if job_id not in UNSURE:
        return find(held, job_id), False
    if not held:
        return None, False
    head = held[0]
    if head.solo or (job_id == FLUSHING and len(held) == 1):
        return head, False
    return None, True


def find(jobs: deque, job_id: int) -> Any:
    for job in jobs:
        if job.id == job_id:
            return job
    return None
