"""Rate limits: what a ``rate_limit`` setting means, and when the next attempt may start.

A limit bounds attempt starts across the whole pool, retries included: in any window of T
seconds at most ``rate * T + 1`` attempts. Any two starts closer than ``1 / rate`` would
already break that bound for a window as long as their gap, so the spacing is strict (GCRA
with no burst beyond the one start it allows now), and time not used is not saved up for a
burst later. Two places enforce it:

- ``Admission`` (the supervisor, through the scheduler; pure, callers pass ``now``): an
  attempt is admitted only once ``1 / rate`` has passed since the previous admission, and
  goes alone to an idle worker, so no batch or mailbox holds it back to start with another.
- ``Gate`` (the workers of one machine): a message's delivery still varies, by tens of ms on
  an overloaded machine, and a late start would land next to the following one's. Right
  before run(), a worker takes its start from a file shared by the stage's workers, which
  holds the earliest time (time.monotonic(): one clock for every process of a machine) the
  next start may take, under flock: the kernel drops the lock of a worker that dies holding
  it. A worker on another machine (Ray) finds no file and relies on the admission alone.
"""

from __future__ import annotations

import fcntl
import math
import os
import re
import struct
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tempfile import TemporaryDirectory

PER = {"s": 1.0, "m": 60.0, "h": 3600.0}  # a rate's unit, in seconds
_RATE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:/\s*([smh]))?\s*")


def parse_rate(value: Any) -> float | None:
    """A ``rate_limit`` setting -> attempts per second (None: no limit). "100/s", "30/m",
    "1000/h", or a number (per second), also as text. ValueError for anything else."""
    if value is None:
        return None
    if isinstance(value, str):
        m = _RATE.fullmatch(value)
        if not m:
            raise ValueError(
                f"rate_limit must be a number per second or N/s, N/m, N/h, got {value!r}"
            )
        rate = float(m.group(1)) / PER[m.group(2) or "s"]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        rate = float(value)
    else:
        raise ValueError(f"rate_limit must be a number or a text like '10/s', got {value!r}")
    if not 0 < rate < math.inf:
        raise ValueError(f"rate_limit must be above 0 and finite, got {value!r}")
    return rate


class Admission:
    """When the next attempt of one rate-limited stage may start."""

    __slots__ = ("interval", "next_at")

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.next_at = -math.inf  # the first attempt goes at once

    def ready(self, now: float) -> bool:
        return now >= self.next_at

    def admit(self, now: float) -> None:
        """An attempt starts now (``ready(now)`` held)."""
        self.next_at = now + self.interval


GateSpec = tuple[int, str, float]  # (stage, file, seconds between starts)
_TIME = struct.Struct("d")


class GateFiles:
    """The gates' files of one pool, made by its backend and removed when it closes."""

    def __init__(self, rates: Sequence[float | None]) -> None:
        self._dir: TemporaryDirectory[str] | None = None
        self.specs: tuple[GateSpec, ...] = ()
        if not any(rates):
            return
        # Here, not at the top: tempfile and what it imports would be on the start-up path of
        # every forkserver worker (they import the user's script, and with it the Pool).
        from tempfile import TemporaryDirectory

        self._dir = TemporaryDirectory(prefix="batchpool-rates-")
        specs = []
        for stage, rate in enumerate(rates):
            if rate:
                path = os.path.join(self._dir.name, f"stage-{stage}")
                open(path, "ab").close()
                specs.append((stage, path, 1.0 / rate))
        self.specs = tuple(specs)

    def remove(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()


class Gate:
    """One rate-limited stage's start gate, in a worker (see the module docstring)."""

    __slots__ = ("fd", "interval")

    def __init__(self, fd: int, interval: float) -> None:
        self.fd = fd
        self.interval = interval

    def wait(self) -> float:
        """Block until an attempt of the stage may start here, and take that start: its
        time.monotonic(), the one the gate spaces the next from."""
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            raw = os.pread(self.fd, _TIME.size, 0)
            not_before = _TIME.unpack(raw)[0] if len(raw) == _TIME.size else -math.inf
            now = time.monotonic()
            while now < not_before:
                time.sleep(not_before - now)
                now = time.monotonic()
            os.pwrite(self.fd, _TIME.pack(now + self.interval), 0)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        return now


def open_gates(specs: Sequence[GateSpec]) -> dict[int, Gate]:
    """Stage -> Gate, for the gates this worker can reach."""
    gates = {}
    for stage, path, interval in specs:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue  # another machine's, or removed with its pool: admission alone
        gates[stage] = Gate(fd, interval)
    return gates
