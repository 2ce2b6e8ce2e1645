"""Which job runs next: the ready queue and the jobs waiting for a retry, behind one small
interface, so that ordering (priorities), admission (rate limits) and cancellation are policies
of this module and never branches of the supervisor's loop.

It holds blocks of jobs (jobs.Block), and counts jobs: ``take(n)`` hands out whole blocks
and cuts the last one to fit, so a map of a million jobs costs a cut per message, not a step
per job. A block marked ``solo`` holds one job that travels alone: the batch it was in failed
as a whole, and running its jobs one at a time finds the culprit.

Order: higher priority first (``Block.priority``), first in, first out within one priority,
except that work already under way goes to the front of its priority (jobs handed back
unstarted, a retry that is due, jobs entering their next stage), so that ordered streams keep
moving and a pipeline drains before it fills. One line (a deque) per priority present and a
sorted list of those priorities: a pool whose jobs all share one priority pays O(1) per block.

Admission: the blocks of a rate-limited stage wait in a lane of their own (lines by priority
again) behind a rates.Admission. A rate-limited job goes one at a time, once admitted, and
only to an idle worker (``idle``), so it starts when it is admitted: a worker's mailbox never
holds it behind another job, where its start would drift towards the next one's. While the
best job that may go now is such a job, a busy worker gets nothing (it would be fed work that
keeps it busy); a lane not admitted yet lets the other jobs pass. ``next_due`` names the next
admission, so the loop sleeps until then instead of polling.

Pure logic: no processes, no clock of its own (callers pass ``now``).
"""

from __future__ import annotations

import math
from bisect import insort
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, Protocol, TypeVar

from .rates import Admission
from .timers import Timers


class Queued(Protocol):
    """What the scheduler needs of a block of jobs (jobs.Block)."""

    size: int  # jobs in it
    ids: range
    solo: bool
    stage: int
    priority: int

    def cut(self, k: int) -> Any: ...  # the first k jobs, as a block of the same type


Q = TypeVar("Q", bound=Queued)


class Lines(Generic[Q]):
    """Blocks by priority: a deque per priority present, the highest first."""

    __slots__ = ("_by", "_order", "jobs")

    def __init__(self) -> None:
        self._by: dict[int, deque[Q]] = {}
        self._order: list[int] = []  # the priorities present, negated, ascending
        self.jobs = 0

    def _line(self, priority: int) -> deque[Q]:
        line = self._by.get(priority)
        if line is None:
            line = self._by[priority] = deque()
            insort(self._order, -priority)
        return line

    def append(self, block: Q) -> None:
        self._line(block.priority).append(block)
        self.jobs += block.size

    def appendleft(self, block: Q) -> None:
        self._line(block.priority).appendleft(block)
        self.jobs += block.size

    def front(self) -> deque[Q] | None:
        """The line of the highest priority that holds blocks; empty lines go."""
        order = self._order
        while order:
            line = self._by[-order[0]]
            if line:
                return line
            del self._by[-order[0]]
            del order[0]
        return None

    def __iter__(self) -> Iterator[Q]:
        for p in self._order:
            yield from self._by[-p]

    def remove(self, block: Q) -> bool:
        line = self._by.get(block.priority)
        if line is None:
            return False
        try:
            line.remove(block)
        except ValueError:
            return False
        self.jobs -= block.size
        return True

    def remove_where(self, predicate: Callable[[Q], bool]) -> list[Q]:
        out: list[Q] = []
        for line in self._by.values():
            kept: list[Q] = []
            for block in line:
                (out if predicate(block) else kept).append(block)
            if len(kept) < len(line):
                line.clear()
                line.extend(kept)
        self.jobs -= sum(b.size for b in out)
        return out

    def clear(self) -> list[Q]:
        blocks = list(self)
        self._by.clear()
        self._order.clear()
        self.jobs = 0
        return blocks


class Scheduler(Generic[Q]):
    """``rates``: per stage, attempts per second, or None (no limit)."""

    def __init__(self, rates: Sequence[float | None] = ()) -> None:
        self._free: Lines[Q] = Lines()  # the blocks of stages without a rate limit
        self._limited = {s: (Lines[Q](), Admission(r)) for s, r in enumerate(rates) if r}
        self._waiting = Timers()  # id(block) -> block, due at its retry time
        self._waiting_jobs = 0
        self._solo = 0  # solo blocks held, ready or waiting (rare: skip the scans without)
        self._now = -math.inf  # the latest time a caller gave
        # The lowest priority ever queued: while no job ranks above it, no worker can hold
        # one of a lower priority than the next, and dispatch skips that check.
        self.floor: float = math.inf

    # -- what is there -----------------------------------------------------------------------
    def __len__(self) -> int:
        """Jobs ready to run (admitted or not)."""
        if not self._limited:
            return self._free.jobs
        return self._free.jobs + sum(lines.jobs for lines, _ in self._limited.values())

    def __iter__(self) -> Iterator[Q]:
        """The ready blocks: those of unlimited stages in order, then each limited stage's."""
        yield from self._free
        for lines, _ in self._limited.values():
            yield from lines

    @property
    def waiting(self) -> int:
        """Jobs waiting for a retry."""
        return self._waiting_jobs

    @property
    def unlimited(self) -> int:
        """Ready jobs of stages without a rate limit."""
        return self._free.jobs

    def head(self, now: float, idle: bool = True) -> Q | None:
        """The block that ``take(n, now, idle)`` would hand out (the first part of) first."""
        if not self._limited:  # the common case, once per worker and pass
            line = self._free.front()
            return line[0] if line else None
        lane = self._choose(now, idle)
        if lane is None:
            return None
        line = lane[0].front()
        return None if line is None else line[0]

    def next_due(self) -> float | None:
        """When the next waiting block becomes ready, or the next rate-limited job is
        admitted (where one waits, and not before the latest ``now``: a job admitted already
        waits for a worker, which a message will announce)."""
        at = self._waiting.next_at()
        for lines, gate in self._limited.values():
            if lines.jobs and gate.next_at > self._now and (at is None or gate.next_at < at):
                at = gate.next_at
        return at

    # -- in ------------------------------------------------------------------------------------
    def add(self, blocks: list[Q]) -> None:
        """New blocks (never solo), behind every block of their priority ready now."""
        for block in blocks:
            self._lines(block).append(block)
            self._seen(block.priority)

    def push_front(self, blocks: list[Q]) -> None:
        """Work already under way, ahead of everything of its priority, in the given order."""
        for block in reversed(blocks):
            self._lines(block).appendleft(block)
            self._seen(block.priority)
        self._count_solo(blocks, 1)

    def defer(self, block: Q, at: float) -> None:
        """Ready again at ``at`` (a retry's backoff); it occupies nothing meanwhile."""
        self._waiting.schedule(at, id(block), block)
        self._waiting_jobs += block.size
        self._count_solo([block], 1)

    def release(self, now: float) -> None:
        """Waiting blocks that are due: to the front of their priority, earliest first."""
        self._now = now
        due = self._waiting.pop_due(now)
        for _, block in reversed(due):
            self._waiting_jobs -= block.size
            self._lines(block).appendleft(block)

    # -- out -----------------------------------------------------------------------------------
    def take(self, n: int, now: float, idle: bool = True) -> list[Q]:
        """Blocks of up to ``n`` jobs in all for one message to a worker (``idle``: running
        nothing), best first, the last one cut to fit; a solo block goes alone and a batch
        stops before one; a rate-limited job goes alone."""
        self._now = now
        lane = self._choose(now, idle)
        if lane is None:
            return []
        lines, gate = lane
        if gate is not None:
            gate.admit(now)
            n = 1
        taken: list[Q] = []
        left = n
        line = lines.front()
        while left > 0 and line:
            block = line[0]
            if block.solo:
                if not taken:
                    taken.append(line.popleft())
                    self._solo -= 1
                    left -= 1
                break
            k = block.size
            if k <= left:
                taken.append(line.popleft())
                left -= k
                if not line:  # on to the next priority down
                    line = lines.front()
            else:
                taken.append(block.cut(left))
                left = 0
        lines.jobs -= n - left
        return taken

    def remove(self, block: Q) -> bool:
        """Take a block out, ready or waiting for its retry (a cancellation); False if it is
        in neither."""
        if self._lines(block).remove(block):
            self._count_solo([block], -1)
            return True
        if self._waiting.payload(id(block)) is not block:
            return False
        self._waiting.cancel(id(block))
        self._waiting_jobs -= block.size
        self._count_solo([block], -1)
        return True

    def remove_where(self, predicate: Callable[[Q], bool]) -> list[Q]:
        """Take out every block, ready or waiting, for which ``predicate`` holds (a deadline,
        or cancel_pending()); ready ones first, in their order."""
        out = self._free.remove_where(predicate)
        for lines, _ in self._limited.values():
            out += lines.remove_where(predicate)
        for key, block in self._waiting.items():
            if predicate(block):
                self._waiting.cancel(key)
                self._waiting_jobs -= block.size
                out.append(block)
        self._count_solo(out, -1)
        return out

    def drain(self) -> list[Q]:
        """Every block, ready or waiting, out of the scheduler."""
        blocks = self._free.clear()
        for lines, _ in self._limited.values():
            blocks += lines.clear()
        blocks.extend(block for _, block in self._waiting.pop_due(math.inf))
        self._waiting_jobs = self._solo = 0
        return blocks

    # -- inside --------------------------------------------------------------------------------
    def _lines(self, block: Q) -> Lines[Q]:
        if self._limited:
            lane = self._limited.get(block.stage)
            if lane is not None:
                return lane[0]
        return self._free

    def _seen(self, priority: int) -> None:
        if priority < self.floor:
            self.floor = priority

    def _choose(self, now: float, idle: bool) -> tuple[Lines[Q], Admission | None] | None:
        """The lane to take from: the one whose first block ranks highest of those that may
        go now, by priority, then by stage (later first); a rate-limited lane only once
        admitted, and then only for an idle worker."""
        line = self._free.front()
        if not self._limited:
            return None if line is None else (self._free, None)
        best = None if line is None else line[0]
        chosen: tuple[Lines[Q], Admission | None] | None = (
            None if line is None else (self._free, None)
        )
        for lines, gate in self._limited.values():
            if not lines.jobs or not gate.ready(now):
                continue
            line = lines.front()
            if line is None:
                continue
            first = line[0]
            if best is None or (first.priority, first.stage) > (best.priority, best.stage):
                best, chosen = first, (lines, gate)
        if chosen is not None and chosen[1] is not None and not idle:
            return None  # it waits for an idle worker; a busy one gets nothing meanwhile
        return chosen

    def _count_solo(self, blocks: list[Q], sign: int) -> None:
        if self._solo or sign > 0:
            self._solo += sign * sum(1 for block in blocks if block.solo)
