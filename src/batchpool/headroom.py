"""The machine's CPU and memory, as the scaling policy reads them (scaling.Machine).

psutil is read at most once per EVERY seconds, whatever the number of loop passes that ask:
between reads the last reading stands. CPU busy is this probe's own delta of the machine's CPU
times, not ``psutil.cpu_percent()``, whose one module-wide baseline any other caller in the
process would reset. psutil is imported on first use, by a pool that scales: importing it
costs ~10 ms, on the start-up path of every worker (a forkserver worker imports the user's main
module, and with it batchpool.pool).
"""

from __future__ import annotations

import os
from typing import Any

from .scaling import Machine

EVERY = 1.0  # seconds between psutil reads


class Headroom:
    def __init__(self, now: float) -> None:
        import psutil

        self._psutil = psutil
        self.cores = os.cpu_count() or 1
        self._times = psutil.cpu_times()
        self._at = now
        # Until a first interval is measured: the 1-minute load average, per core.
        self._machine = self._read(min(1.0, os.getloadavg()[0] / self.cores))

    def machine(self, now: float) -> Machine:
        """The current reading, at most EVERY seconds old."""
        if now - self._at >= EVERY:
            times = self._psutil.cpu_times()
            busy = busy_share(self._times, times)
            self._times, self._at = times, now
            self._machine = self._read(min(1.0, max(0.0, busy)))
        return self._machine

    def _read(self, busy: float) -> Machine:
        memory = self._psutil.virtual_memory()
        return Machine(busy, self.cores, memory.available, memory.total)


def busy_share(before: Any, after: Any) -> float:
    """The share of all CPUs' time between two ``psutil.cpu_times()`` readings that was busy."""
    total = _total(after) - _total(before)
    idle = _idle(after) - _idle(before)
    return 1.0 - idle / total if total > 0 else 0.0


def _total(times: Any) -> float:
    """Seconds of CPU time in all (Linux counts guest time inside user time already)."""
    return float(sum(times)) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)


def _idle(times: Any) -> float:
    """Seconds the CPUs had nothing to run (waiting on I/O counts: a worker could run)."""
    return float(getattr(times, "idle", 0.0) + getattr(times, "iowait", 0.0))
