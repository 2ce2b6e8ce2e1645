"""Which job runs next: the ready queue and the jobs waiting for a retry, behind one small
interface, so that ordering (priorities), admission (rate limits) and cancellation are policies
of this module and never branches of the supervisor's loop.

Order today: first in, first out, except that work already under way goes to the front (a
job handed back unstarted, a retry that is due, a job entering its next stage), so that
ordered streams keep moving. A job marked ``solo`` travels alone: the batch it was in failed
as a whole, and running its jobs one at a time finds the culprit.

Pure logic: no processes, no clock of its own (callers pass ``now``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Protocol

from .timers import Timers


class Queued(Protocol):
    """What the scheduler needs of a job."""

    id: int
    solo: bool


class Scheduler:
    def __init__(self) -> None:
        self._ready: deque[Queued] = deque()
        self._waiting = Timers()  # job id -> job, due at its retry time
        self._solo = 0  # solo jobs held, ready or waiting (rare: skip the scans without)

    # -- what is there -----------------------------------------------------------------------
    def __len__(self) -> int:
        """Jobs ready to run now."""
        return len(self._ready)

    def __iter__(self) -> Iterator[Queued]:
        return iter(self._ready)

    @property
    def waiting(self) -> int:
        """Jobs waiting for a retry."""
        return len(self._waiting)

    def head(self) -> Queued | None:
        """The job that ``take`` would hand out first."""
        return self._ready[0] if self._ready else None

    def next_due(self) -> float | None:
        """When the next waiting job becomes ready."""
        return self._waiting.next_at()

    # -- in ------------------------------------------------------------------------------------
    def add(self, jobs: list) -> None:
        """New jobs (never solo), behind every job ready now."""
        self._ready.extend(jobs)

    def push_front(self, jobs: list) -> None:
        """Work already under way, ahead of everything, in the given order."""
        self._ready.extendleft(reversed(jobs))
        self._count_solo(jobs, 1)

    def defer(self, job: Queued, at: float) -> None:
        """Ready again at ``at`` (a retry's backoff); it occupies nothing meanwhile."""
        self._waiting.schedule(at, job.id, job)
        self._count_solo([job], 1)

    def release(self, now: float) -> None:
        """Waiting jobs that are due: to the front, earliest first."""
        due = [job for _, job in self._waiting.pop_due(now)]
        if due:
            self._ready.extendleft(reversed(due))

    # -- out -----------------------------------------------------------------------------------
    def take(self, n: int) -> list:
        """Up to ``n`` ready jobs for one message, from the front; a solo job goes alone and
        a batch stops before one."""
        ready = self._ready
        n = min(n, len(ready))
        if self._solo:
            n = self._solo_cut(n)
        popleft = ready.popleft
        taken = [popleft() for _ in range(n)]
        if self._solo:
            self._count_solo(taken, -1)
        return taken

    def _solo_cut(self, n: int) -> int:
        ready = self._ready
        if n and ready[0].solo:
            return 1
        for i in range(1, n):
            if ready[i].solo:
                return i
        return n

    def remove(self, job: Queued) -> bool:
        """Take a ready job out of the queue (a cancellation); False if it is not there."""
        try:
            self._ready.remove(job)
        except ValueError:
            return False
        self._count_solo([job], -1)
        return True

    def drain(self) -> list:
        """Every job, ready or waiting, out of the scheduler."""
        jobs = list(self._ready)
        self._ready.clear()
        jobs.extend(job for _, job in self._waiting.pop_due(float("inf")))
        self._solo = 0
        return jobs

    def _count_solo(self, jobs: list, sign: int) -> None:
        if self._solo or sign > 0:
            self._solo += sign * sum(1 for job in jobs if job.solo)
