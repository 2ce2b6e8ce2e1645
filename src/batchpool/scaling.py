"""When a pool of ``procs=(min, max)`` grows or shrinks: a pure decision on a snapshot.

The supervisor describes what it knows (its workers, the jobs waiting, the machine's CPU and
memory) as a ``View``, and ``decide`` answers with one ``Decision``; the supervisor acts on it.
No processes, no clock, no psutil here (callers pass ``now`` and the machine's readings), so
the rules are tested with hypothesis, without sleeps:

- grow by one worker while jobs wait, every worker is ready and busy (a worker still starting
  is capacity on its way: growth is one at a time), fewer than ``high`` workers are alive
  (starting and stopping ones included), the CPU has headroom (at least MIN_IDLE_CORES idle)
  and available memory is at least twice the largest worker's RSS;
- retire a worker idle for ``idle_timeout`` seconds, the longest idle first, down to ``low``;
- under memory pressure (available below PRESSURE of the total) retire workers down to ``low``
  at once: idle ones now, busy ones after their current job; never grow then.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

PRESSURE = 0.10  # available memory below this share of the total: shed workers
MIN_IDLE_CORES = 0.5  # a new worker needs a core to run on; half a core absorbs sampling noise
RSS_MARGIN = 2  # grow only while available memory holds this many of the largest worker


class Bounds(NamedTuple):
    """``procs=(low, high)`` and ``idle_timeout``, checked (see ``check``). This module's
    records are NamedTuples: every Pool imports them, and they build ~8x faster than frozen
    dataclasses (~3 ms of a pool's start-up)."""

    low: int
    high: int
    idle_timeout: float


class Worker(NamedTuple):
    """What the policy needs of one live worker."""

    slot: int
    ready: bool  # started and set up
    busy: bool  # holds jobs
    idle_since: float  # when it last ran out of jobs (read when ready and not busy)
    leaving: bool  # stopping or retiring: not capacity any more, but still alive


class Machine(NamedTuple):
    """The machine's readings: CPU busy share over the last interval, memory in bytes."""

    cpu_busy: float  # 0.0 .. 1.0
    cores: int
    available: int
    total: int

    @property
    def pressed(self) -> bool:
        return self.available < PRESSURE * self.total

    @property
    def cpu_headroom(self) -> bool:
        return (1.0 - self.cpu_busy) * self.cores >= MIN_IDLE_CORES


class View(NamedTuple):
    now: float
    workers: Sequence[Worker]
    waiting: int  # jobs queued or prefetched behind a running one
    machine: Machine
    largest_rss: int  # bytes, the largest worker's last sample


class Decision(NamedTuple):
    grow: bool = False
    retire: tuple[int, ...] = ()  # slots of idle workers: stop them now
    drain: tuple[int, ...] = ()  # slots of busy workers: stop them after their current job
    why: str = ""
    wake_at: float | None = None  # when an idle worker's timeout falls due: decide again


NOTHING = Decision()


def check(procs: object, idle_timeout: object) -> Bounds:
    """ValueError unless ``procs`` is ``(low, high)`` with 1 <= low <= high and
    ``idle_timeout`` a finite number of seconds > 0."""
    if (
        not isinstance(procs, tuple)
        or len(procs) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in procs)
    ):
        raise ValueError(f"procs must be an integer or a (min, max) pair, got {procs!r}")
    low, high = procs
    if low < 1 or high < low:
        raise ValueError(f"procs=(min, max) needs 1 <= min <= max, got {procs!r}")
    return Bounds(low, high, check_idle_timeout(idle_timeout))


def check_idle_timeout(idle_timeout: object) -> float:
    if (
        isinstance(idle_timeout, bool)
        or not isinstance(idle_timeout, (int, float))
        or not 0 < idle_timeout < float("inf")
    ):
        raise ValueError(f"idle_timeout must be a number of seconds > 0, got {idle_timeout!r}")
    return float(idle_timeout)


def decide(bounds: Bounds, view: View) -> Decision:
    active = [w for w in view.workers if not w.leaving]
    spare = len(active) - bounds.low  # workers that may retire
    idle = sorted((w for w in active if w.ready and not w.busy), key=lambda w: w.idle_since)
    machine = view.machine
    if machine.pressed:
        return _shed(active, spare, machine) if spare > 0 else NOTHING
    if idle:
        timeout = bounds.idle_timeout
        due = [w.slot for w in idle if w.idle_since + timeout <= view.now][: max(0, spare)]
        later = [w.idle_since + timeout for w in idle if w.slot not in due]
        wake_at = min(later) if later and spare > len(due) else None
        if due:
            return Decision(retire=tuple(due), why=f"idle for {timeout:g} s", wake_at=wake_at)
        return Decision(wake_at=wake_at)
    if (
        view.waiting > 0
        and len(view.workers) < bounds.high
        and all(w.ready and w.busy for w in active)
        and machine.cpu_headroom
        and machine.available >= RSS_MARGIN * view.largest_rss
    ):
        return Decision(grow=True, why=f"{view.waiting} jobs waiting, all workers busy")
    return NOTHING


def _shed(active: list[Worker], spare: int, machine: Machine) -> Decision:
    """Memory pressure: ``spare`` workers go, those without a job first (now), then busy ones
    (after their current job)."""
    free = sorted((w for w in active if not w.busy), key=lambda w: w.idle_since)
    out = (free + [w for w in active if w.busy])[:spare]
    share = machine.available / machine.total if machine.total else 0.0
    return Decision(
        retire=tuple(w.slot for w in out if not w.busy),
        drain=tuple(w.slot for w in out if w.busy),
        why=f"memory pressure ({share:.0%} available)",
    )
