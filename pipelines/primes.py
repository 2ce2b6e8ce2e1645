"""Count the primes below 2,000,000 in 200 ranges of 10,000 numbers, and print the total.

Shows the simplest pipeline: a list source, one CPU-bound stage, a sink that totals the counts
in the supervisor and prints the total when the last range is in. It runs both ways:

    batchpool run pipelines/primes.py --procs 2    # progress bar, summary, journal
    python pipelines/primes.py                     # the same run from the Python API

Interrupt the first with Ctrl-C, then continue with ``--resume``. ``PRIMES_RANGES=20`` makes
the run smaller (primes below 200,000).
"""

import os
import sys

from batchpool import Pipeline, Task

SPAN = 10_000
RANGES = int(os.environ.get("PRIMES_RANGES", "200"))


class CountPrimes(Task):
    """Trial division by odd numbers: deliberately pure-Python CPU work."""

    retries = 1

    def run(self, start: int) -> int:
        count = 0
        for n in range(max(start, 2), start + SPAN):
            if n % 2 == 0:
                count += n == 2
                continue
            d = 3
            while d * d <= n:
                if n % d == 0:
                    break
                d += 2
            else:
                count += 1
        return count


class Total:
    """The sink: runs in the supervisor process, once per finished range."""

    def __init__(self) -> None:
        self.primes = self.ranges = self.failed = 0

    def __call__(self, result) -> None:
        self.ranges += 1
        if result.ok:
            self.primes += result.value
        else:
            self.failed += 1
        if self.ranges == RANGES:
            limit = f"{RANGES * SPAN:,}"
            if self.failed:
                print(f"{self.failed} of {RANGES} ranges failed: no total of primes below {limit}")
            else:
                print(f"{self.primes} primes below {limit}")


total = Total()
pipeline = Pipeline([i * SPAN for i in range(RANGES)], CountPrimes(), name="primes", sink=total)

if __name__ == "__main__":  # required: workers import this file again to find CountPrimes
    report = pipeline.run()
    sys.exit(1 if report.failed or report.error else 0)
