"""How a run stops: signals routed to flags, a second signal's hard stop, and the one reason
the run reports, whatever asked first (a signal, the deadline, the source, the sink, the
journal, workers that cannot start).

Signal handlers only set flags; the run loop acts on them between results. Stopping drains:
attempts already running finish and are recorded, jobs not started are dropped (a resume runs
them).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pool import Pool

log = logging.getLogger("batchpool")
DEADLINE = "deadline"  # RunReport.stopped_by of a run stopped by its deadline


class HardStop(BaseException):
    """Raised by the second signal wherever the run loop is: stop at once."""


class Signals:
    """Stop requests from signal handlers.

    The first signal sets a flag the run loop reads between results (it drains in-flight
    attempts). The second raises HardStop in the main thread, so that neither a drain nor a
    sink can hold the run; a BaseException, so user code catching Exception cannot swallow it.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self.hard = False
        self.armed = False  # may raise (the run loop and the drain catch these)

    def request(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        elif not self.hard:
            self.hard = True
            if self.armed:
                raise HardStop()

    def install(self) -> Callable[[], None]:
        """Route SIGINT, SIGTERM and SIGHUP here while the run lasts (main thread only): a
        hangup (a closed terminal, a dropped ssh session) drains like a SIGTERM."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        names = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}
        old = {
            sig: signal.signal(sig, lambda s, f: self.request(names[signal.Signals(s)]))
            for sig in names
        }

        def restore() -> None:
            for sig, handler in old.items():
                signal.signal(sig, handler)

        return restore


class Halt:
    """Why the run stopped (``stopped_by``, ``error``), and the drain that stopping starts."""

    def __init__(self, signals: Signals, pool: Pool, deadline_at: float | None = None) -> None:
        self.signals = signals
        self.pool = pool
        self.deadline_at = deadline_at  # time.monotonic() at which the run stops (--deadline)
        self.stopped_by: str | None = None  # see RunReport.stopped_by
        self.error: str | None = None
        self._signal_seen = False

    def stop(self, reason: str, error: str | None) -> None:
        """Stop intake; let attempts already running finish; drop jobs not started."""
        self.stopped_by = reason
        self.error = error
        self.pool._supervisor.post(("drain",))

    def first(self, reason: str, error: str | None) -> None:
        """Stop, unless the run is stopping already: the first reason is the one reported."""
        if self.stopped_by is None:
            self.stop(reason, error)

    def deadline_passed(self, now: float) -> bool:
        """True once the run's deadline has passed. The first time: stop (unless the run is
        stopping already), the same drain as a first signal's."""
        if self.deadline_at is None or now < self.deadline_at:
            return False
        self.deadline_at = None
        if self.stopped_by is None:
            self.stop(DEADLINE, None)
            running = self.pool.metrics().in_flight
            log.warning("the run's deadline passed; finishing %d running jobs", running)
        return True

    def signalled(self) -> bool:
        """True once a signal asked the run to stop. The first time: stop (unless the run is
        stopping already) and say what the drain waits for and how to cut it short."""
        if self.signals.reason is None:
            return False
        if not self._signal_seen:
            self._signal_seen = True
            log.info("%s received: intake stops, running attempts drain", self.signals.reason)
            self.first(self.signals.reason, None)
            if not self.signals.hard:  # after a second signal there is nothing left to finish
                running = self.pool.metrics().in_flight
                log.warning("finishing %d running jobs; Ctrl-C again to stop now", running)
        return True
