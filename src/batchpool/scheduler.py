"""Which job runs next: the ready queue and the jobs waiting for a retry, behind one small
interface, so that ordering (priorities), admission (rate limits) and cancellation are policies
of this module and never branches of the supervisor's loop.

It holds blocks of jobs (jobs.Block), and counts jobs: ``take(n)`` hands out whole blocks
and cuts the last one to fit, so a map of a million jobs costs a cut per message, not a step
per job. Order today: first in, first out, except that work already under way goes to the
front (jobs handed back unstarted, a retry that is due, jobs entering their next stage), so
that ordered streams keep moving. A block marked ``solo`` holds one job that travels alone:
the batch it was in failed as a whole, and running its jobs one at a time finds the culprit.

Pure logic: no processes, no clock of its own (callers pass ``now``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from operator import attrgetter
from typing import Any, Generic, Protocol, TypeVar

from .timers import Timers

_size = attrgetter("size")


class Queued(Protocol):
    """What the scheduler needs of a block of jobs (jobs.Block)."""

    size: int  # jobs in it
    ids: range
    solo: bool

    def cut(self, k: int) -> Any: ...  # the first k jobs, as a block of the same type


Q = TypeVar("Q", bound=Queued)


class Scheduler(Generic[Q]):
    def __init__(self) -> None:
        self._ready: deque[Q] = deque()
        self._jobs = 0  # in the ready blocks
        self._waiting = Timers()  # first job id -> block, due at its retry time
        self._waiting_jobs = 0
        self._solo = 0  # solo blocks held, ready or waiting (rare: skip the scans without)

    # -- what is there -----------------------------------------------------------------------
    def __len__(self) -> int:
        """Jobs ready to run now."""
        return self._jobs

    def __iter__(self) -> Iterator[Q]:
        """The ready blocks, in order."""
        return iter(self._ready)

    @property
    def waiting(self) -> int:
        """Jobs waiting for a retry."""
        return self._waiting_jobs

    def head(self) -> Q | None:
        """The block that ``take`` would hand out (the first part of) first."""
        return self._ready[0] if self._ready else None

    def next_due(self) -> float | None:
        """When the next waiting block becomes ready."""
        return self._waiting.next_at()

    # -- in ------------------------------------------------------------------------------------
    def add(self, blocks: list[Q]) -> None:
        """New blocks (never solo), behind every block ready now."""
        self._ready.extend(blocks)
        self._jobs += sum(map(_size, blocks))

    def push_front(self, blocks: list[Q]) -> None:
        """Work already under way, ahead of everything, in the given order."""
        self._ready.extendleft(reversed(blocks))
        self._jobs += sum(map(_size, blocks))
        self._count_solo(blocks, 1)

    def defer(self, block: Q, at: float) -> None:
        """Ready again at ``at`` (a retry's backoff); it occupies nothing meanwhile."""
        self._waiting.schedule(at, block.ids[0], block)
        self._waiting_jobs += block.size
        self._count_solo([block], 1)

    def release(self, now: float) -> None:
        """Waiting blocks that are due: to the front, earliest first."""
        due = [block for _, block in self._waiting.pop_due(now)]
        if due:
            k = sum(map(_size, due))
            self._waiting_jobs -= k
            self._jobs += k
            self._ready.extendleft(reversed(due))

    # -- out -----------------------------------------------------------------------------------
    def take(self, n: int) -> list[Q]:
        """Blocks of up to ``n`` jobs in all for one message, from the front, the last one cut
        to fit; a solo block goes alone and a batch stops before one."""
        ready = self._ready
        taken: list[Q] = []
        left = n
        while left > 0 and ready:
            block = ready[0]
            if block.solo:
                if not taken:
                    taken.append(ready.popleft())
                    self._solo -= 1
                    left -= 1
                break
            k = block.size
            if k <= left:
                taken.append(ready.popleft())
                left -= k
            else:
                taken.append(block.cut(left))
                left = 0
        self._jobs -= n - left
        return taken

    def remove(self, block: Q) -> bool:
        """Take a block out, ready or waiting for a retry (a cancellation); False if it is in
        neither."""
        try:
            self._ready.remove(block)
        except ValueError:
            if not block.ids or self._waiting.payload(block.ids[0]) is not block:
                return False
            self._waiting.cancel(block.ids[0])
            self._waiting_jobs -= block.size
        else:
            self._jobs -= block.size
        self._count_solo([block], -1)
        return True

    def remove_where(self, wanted: Callable[[Q], bool]) -> list[Q]:
        """Take out every block, ready or waiting, that ``wanted`` names (a deadline, or
        cancel_pending()); ready ones first, in their order."""
        removed: list[Q] = []
        kept: deque[Q] = deque()
        for block in self._ready:
            (removed if wanted(block) else kept).append(block)
        if removed:
            self._ready = kept
            self._jobs -= sum(map(_size, removed))
        for key, block in self._waiting.items():
            if wanted(block):
                self._waiting.cancel(key)
                self._waiting_jobs -= block.size
                removed.append(block)
        if removed:
            self._count_solo(removed, -1)
        return removed

    def drain(self) -> list[Q]:
        """Every block, ready or waiting, out of the scheduler."""
        blocks = list(self._ready)
        self._ready.clear()
        blocks.extend(block for _, block in self._waiting.pop_due(float("inf")))
        self._jobs = self._waiting_jobs = self._solo = 0
        return blocks

    def _count_solo(self, blocks: list[Q], sign: int) -> None:
        if self._solo or sign > 0:
            self._solo += sign * sum(1 for block in blocks if block.solo)
