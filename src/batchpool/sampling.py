"""A bounded uniform sample of a stream of numbers, fed a batch at a time: the attempt times
behind each stage's p50/p95, at a cost per batch rather than per job; and a histogram of every
one of them, for Prometheus (counts only grow, as its buckets must)."""

from __future__ import annotations

import random
from bisect import bisect_left, bisect_right

#: Upper bounds, in seconds, of the histogram's buckets; a last bucket holds what lies above.
BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Reservoir:
    def __init__(self, size: int = 4096, seed: int = 0) -> None:
        self.size = size
        self.values: list[float] = []
        self.seen = 0
        self.buckets = [0] * (len(BOUNDS) + 1)  # values <= BOUNDS[i] and > BOUNDS[i - 1]
        self.total = 0.0  # of every value seen
        self._rand = random.Random(seed)

    def extend(self, values: list[float]) -> None:
        """Each value seen so far stays in the sample with about the same chance (algorithm R,
        with the draws of one batch taken together)."""
        self.seen += len(values)
        self.total += sum(values)
        self._count(values)
        room = self.size - len(self.values)
        if room > 0:
            self.values.extend(values[:room])
            values = values[room:]
            if not values:
                return
        rand = self._rand
        expected = len(values) * self.size / self.seen
        keep = int(expected) + (rand.random() < expected - int(expected))
        if keep <= 0:
            return
        slots, size, draw = self.values, self.size, rand.random
        n = len(values)
        # Draws with random() (randrange() and sample() cost ~4x, per kept value); the kept
        # values are drawn with replacement, which a quantile does not notice.
        chosen = values if keep >= n else [values[int(draw() * n)] for _ in range(keep)]
        for value in chosen:
            slots[int(draw() * size)] = value

    def _count(self, values: list[float]) -> None:
        """The histogram's share of a batch: in one step when all its values fall in one
        bucket (a batch of like jobs), else through one sort; never a step per value."""
        if not values:
            return
        last = bisect_left(BOUNDS, max(values))
        # Times are never negative: all in the first bucket needs no min() (tiny jobs, whose
        # batches are the long ones).
        if last == 0 or last == bisect_left(BOUNDS, min(values)):
            self.buckets[last] += len(values)
            return
        ordered = sorted(values)
        below = 0
        for i, bound in enumerate(BOUNDS):
            upto = bisect_right(ordered, bound)
            self.buckets[i] += upto - below
            below = upto
        self.buckets[-1] += len(ordered) - below

    def quantile(self, q: float) -> float | None:
        if not self.values:
            return None
        ordered = sorted(self.values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
