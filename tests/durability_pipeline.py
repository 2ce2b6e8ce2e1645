"""Pipeline file for tests/test_durability.py, run by the real ``batchpool run`` CLI.

Configured by environment variables, read at import (the supervisor and every worker import
this file, under any start method, with the same environment):

  DUR_N         number of jobs (payloads 0..N-1)                          [300]
  DUR_MS        "LO,HI": each job sleeps LO..HI ms, fixed per payload     ["10,30"]
  DUR_PAD       length of the value's padding string (0: value is 3*n)    [0]
  DUR_SIDE      side-effect file: each run() appends "payload\\n" with one
                O_APPEND write (faults.append_line), before returning (unset: none)

``expected_value(n, pad)`` is what a job's value must be. ``other`` is the same work under a
different pipeline name, for the "journal of another pipeline" check.
"""

from __future__ import annotations

import os
import time

from faults import append_line

from batchpool import Pipeline, Task

N = int(os.environ.get("DUR_N", "300"))
LO, HI = (int(x) for x in os.environ.get("DUR_MS", "10,30").split(","))
PAD = int(os.environ.get("DUR_PAD", "0"))


def expected_value(n: int, pad: int = 0) -> object:
    return f"{n}:" + "x" * pad if pad else 3 * n


def duration(n: int) -> float:
    """Seconds job ``n`` sleeps: spread over [LO, HI] ms, the same in every run."""
    return (LO + (n * 7919) % (HI - LO + 1)) / 1000.0


class Append(Task):
    """Records that it ran (a side effect a resume must not repeat for final jobs)."""

    retries = 0

    def __init__(self, side: str | None, pad: int) -> None:
        self.side = side
        self.pad = pad

    def run(self, n: int) -> object:
        if self.side:
            append_line(self.side, str(n))
        time.sleep(duration(n))
        return expected_value(n, self.pad)


pipeline = Pipeline(list(range(N)), Append(os.environ.get("DUR_SIDE"), PAD), name="durability")
other = Pipeline(list(range(N)), Append(None, PAD), name="durability_other")
