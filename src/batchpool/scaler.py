"""Autoscaling in the loop, for a pool of ``procs=(min, max)``: when to ask scaling.decide, and
acting on its answer through the Workforce.

The policy is asked only when its answer can change, never by polling:

- after a dispatch that leaves jobs waiting while the pool has room to grow (``after_dispatch``):
  a grow, one worker at a time, since a worker still starting blocks the next;
- when a worker runs out of jobs, a "scale" timer is set for its idle timeout (``idle``);
- at each RSS sample (about once a second), for memory pressure (``tick``).

The machine's CPU and memory come from headroom.Headroom, read at most once a second.
"""

from __future__ import annotations

from .headroom import Headroom
from .jobs import JobBook
from .ledger import WorkerView
from .scaling import Bounds, Decision, View, Worker, decide
from .timers import Timers
from .workforce import Workforce

SCALE = "scale"  # the timer key of the next idle timeout


class Scaler:
    def __init__(
        self, bounds: Bounds, workforce: Workforce, book: JobBook, timers: Timers, now: float
    ) -> None:
        self.bounds = bounds
        self.workforce = workforce
        self.book = book
        self.timers = timers
        self.headroom = Headroom(now)
        self.wake_at: float | None = None  # the "scale" timer, when set

    def ready(self, w: WorkerView) -> None:
        """A worker's memory after setup() is the size of the next one: the grow check needs
        it now, not at the next RSS sample."""
        self.workforce.sample_rss([w])

    def idle(self, now: float) -> None:
        self._wake(now + self.bounds.idle_timeout)

    def after_dispatch(self, now: float) -> bool:
        """True if it decided to grow (the caller starts the worker)."""
        workers = self.workforce.workers
        if len(workers) >= self.bounds.high:
            return False
        if not len(self.book.queue) and not any(w.holding > 1 for w in workers.values()):
            return False
        return self._act(now)

    def tick(self, now: float) -> bool:
        """The "scale" timer or an RSS sample: idle timeouts due, memory pressure."""
        if self.wake_at is not None and now >= self.wake_at:
            self.wake_at = None
        return self._act(now)

    def _act(self, now: float) -> bool:
        d = decide(self.bounds, self._view(now))
        self._apply(d, now)
        return d.grow

    def _view(self, now: float) -> View:
        workers = list(self.workforce.workers.values())
        return View(
            now=now,
            workers=[
                Worker(
                    w.slot,
                    w.ready,
                    w.holding > 0,
                    w.idle_since,
                    w.stopping or w.retiring or w.killed_for is not None,
                )
                for w in workers
            ],
            waiting=len(self.book.queue) + sum(w.holding - 1 for w in workers if w.holding > 1),
            machine=self.headroom.machine(now),
            largest_rss=max((w.rss for w in workers), default=0),
        )

    def _apply(self, d: Decision, now: float) -> None:
        workers = self.workforce.workers
        for slot in d.retire + d.drain:
            self.workforce.retire(workers[slot], now, d.why)
        if d.grow:
            self.workforce.grow(d.why)
        if d.wake_at is not None:
            self._wake(d.wake_at)

    def _wake(self, at: float) -> None:
        if self.wake_at is None or at < self.wake_at:
            self.wake_at = at
            self.timers.schedule(at, SCALE)
