"""Rate limits: what a ``rate_limit`` setting means, and when the next attempt may start.

A limit bounds attempt starts across the whole pool, retries included: in any window of T
seconds at most ``rate * T + 1`` attempts. Any two starts closer than ``1 / rate`` would
already break that bound for a window as long as their gap, so the admission is strict
spacing (GCRA with no burst beyond the one start it allows now): an attempt is admitted at
``now`` only once ``1 / rate`` has passed since the previous admission, and time not used is
not saved up for a burst later.

Pure logic: no clock of its own (callers pass ``now``).
"""

from __future__ import annotations

import math
import re
from typing import Any

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
