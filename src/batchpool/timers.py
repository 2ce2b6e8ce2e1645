"""One heap of keyed deadlines (attempt timeouts, retry times).

The clock is not read here: callers pass ``now``, so tests drive time by hand. Rescheduling or
cancelling a key is O(1); stale heap entries are skipped when they surface.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from typing import Any


class Timers:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Hashable]] = []
        self._live: dict[Hashable, tuple[int, Any]] = {}  # key -> (entry id, payload)
        self._ids = itertools.count()

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._live

    def schedule(self, at: float, key: Hashable, payload: Any = None) -> None:
        """Fire ``key`` at ``at``, replacing any earlier schedule of the same key."""
        entry = next(self._ids)
        self._live[key] = (entry, payload)
        heapq.heappush(self._heap, (at, entry, key))

    def cancel(self, key: Hashable) -> None:
        self._live.pop(key, None)

    def payload(self, key: Hashable) -> Any:
        """What ``key`` was scheduled with; None if it is not scheduled."""
        live = self._live.get(key)
        return None if live is None else live[1]

    def items(self) -> list[tuple[Hashable, Any]]:
        """``(key, payload)`` of every live timer, in no particular order."""
        return [(key, live[1]) for key, live in self._live.items()]

    def next_at(self) -> float | None:
        """When the earliest live timer is due, or None."""
        heap = self._heap
        while heap:
            _, entry, key = heap[0]
            live = self._live.get(key)
            if live is not None and live[0] == entry:
                return heap[0][0]
            heapq.heappop(heap)
        return None

    def pop_due(self, now: float) -> list[tuple[Hashable, Any]]:
        """Remove and return ``(key, payload)`` of every timer due at ``now``, earliest first."""
        due = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, entry, key = heapq.heappop(heap)
            live = self._live.get(key)
            if live is not None and live[0] == entry:
                del self._live[key]
                due.append((key, live[1]))
        return due
