"""Tasks that record when each attempt starts, for the priority and rate-limit tests (importable
under every start method and by Ray actors, like faults.py).

A start is one line ``tag payload monotonic_time pid``, appended by run() before anything else,
with one O_APPEND write (CLOCK_MONOTONIC is system-wide on Linux, so the lines of several
workers compare).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, NamedTuple

from faults import Base, append_line


class Start(NamedTuple):
    tag: str
    payload: str
    at: float
    pid: int


def starts(log: str | os.PathLike, tag: str | None = None) -> list[Start]:
    """Recorded starts, earliest first (only ``tag``'s, if given)."""
    path = Path(log)
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        t, payload, at, pid = line.split()
        if tag is None or t == tag:
            found.append(Start(t, payload, float(at), int(pid)))
    return sorted(found, key=lambda s: s.at)


def most_in_window(times: list[float], seconds: float) -> int:
    """The most of ``times`` (sorted) that any closed window of ``seconds`` holds."""
    most = 0
    j = 0
    for i, t in enumerate(times):
        while times[j] < t - seconds:
            j += 1
        most = max(most, i - j + 1)
    return most


class Stamp(Base):
    """Records its start, sleeps ``delay`` seconds, returns the payload. Payloads in
    ``flaky`` fail (retryably) while fewer than ``fail_times`` attempts of them have started."""

    def __init__(
        self,
        log: str | os.PathLike,
        tag: str = "job",
        delay: float = 0.0,
        flaky: frozenset[str] = frozenset(),
        fail_times: int = 1,
        **policy: Any,
    ) -> None:
        super().__init__(**policy)
        self.log = str(log)
        self.tag = tag
        self.delay = delay
        self.flaky = flaky
        self.fail_times = fail_times

    def run(self, payload: Any) -> Any:
        append_line(self.log, f"{self.tag} {payload} {time.monotonic()!r} {os.getpid()}")
        if self.delay:
            time.sleep(self.delay)
        if str(payload) in self.flaky:
            tried = [s for s in starts(self.log, self.tag) if s.payload == str(payload)]
            if len(tried) <= self.fail_times:
                raise RuntimeError(f"attempt {len(tried)} of {payload} fails")
        return payload
