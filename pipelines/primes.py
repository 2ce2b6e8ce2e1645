"""Count the primes below 2,000,000 in 200 ranges of 10,000 numbers.

Shows the simplest pipeline: a list source, one CPU-bound stage, a sink that totals the counts
in the supervisor. Try ``batchpool run pipelines/primes.py --procs 2``, interrupt it with
Ctrl-C, then continue with ``--resume``.
"""

from batchpool import Pipeline, Task

SPAN = 10_000
RANGES = 200


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
        self.primes = 0

    def __call__(self, result) -> None:
        if result.ok:
            self.primes += result.value


total = Total()
pipeline = Pipeline([i * SPAN for i in range(RANGES)], CountPrimes(), name="primes", sink=total)
