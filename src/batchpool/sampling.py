"""A bounded uniform sample of a stream of numbers, fed a batch at a time: the attempt times
behind each stage's p50/p95, at a cost per batch rather than per job."""

from __future__ import annotations

import random


class Reservoir:
    def __init__(self, size: int = 4096, seed: int = 0) -> None:
        self.size = size
        self.values: list[float] = []
        self.seen = 0
        self._rand = random.Random(seed)

    def extend(self, values: list[float]) -> None:
        """Each value seen so far stays in the sample with about the same chance (algorithm R,
        with the draws of one batch taken together)."""
        self.seen += len(values)
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

    def quantile(self, q: float) -> float | None:
        if not self.values:
            return None
        ordered = sorted(self.values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
