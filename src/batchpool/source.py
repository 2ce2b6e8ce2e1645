"""A pipeline's source: read in its own thread, merged with what the journal recorded.

The run loop takes items from here without ever blocking, so a slow or blocking source (a
network listing, a generator reading files) never keeps it from collecting results, journaling
them and acting on signals.
"""

from __future__ import annotations

import queue
import threading
import traceback
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Any, Final, Literal

from .journal import JournalError, JournalWriter, fingerprint

PUT_POLL = 0.1  # seconds between looks at close() while the queue is full


class _Marker(Enum):
    EMPTY = "the source has nothing ready yet"
    END = "the source is exhausted"


EMPTY: Final = _Marker.EMPTY
_END: Final = _Marker.END
Empty = Literal[_Marker.EMPTY]
Item = tuple[int, Any]  # (index, payload)
Merged = tuple[int, Any, str | None]  # (index, payload, recorded status)


class SourceChangedError(JournalError):
    """The source yields a different payload at an index than the journal recorded."""

    def __init__(self, path: Path, index: int) -> None:
        super().__init__(
            f"the source changed since journal {path} was written: the payload at index "
            f"{index} differs from the recorded one (start over with --fresh)"
        )
        self.index = index


class SourceFailed(Exception):
    """The source raised: ``text`` is its traceback, for the report."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


_Queued = Item | SourceFailed | Literal[_Marker.END]  # what the source's thread hands over


class Feed:
    """Reads the source in its own thread into a bounded queue.

    ``next()`` never blocks: it returns EMPTY when no item is ready, and raises SourceFailed
    where the source raised. A callable source is called here, once, in the thread that
    iterates what it returns: a source bound to its thread (a sqlite3 cursor) works, and an
    error in the call is a source failure like any other.
    """

    def __init__(
        self,
        source: Any,
        size: int,
        poke: Callable[[], None],
        on_length: Callable[[int | None], None],
    ) -> None:
        self.queue: queue.Queue[_Queued] = queue.Queue(maxsize=size)
        self.poke = poke  # told when items are ready again: the run loop may be waiting
        self.on_length = on_length  # told len() of what a callable source returned
        self.closed = False
        thread = threading.Thread(
            target=self._read, args=(source,), name="batchpool-source", daemon=True
        )
        thread.start()

    def _read(self, source: Any) -> None:
        try:
            if callable(source):
                source = source()
                self.on_length(length(source))
            for item in enumerate(source):
                if not self._put(item):
                    return
        except BaseException:
            self._put(SourceFailed(traceback.format_exc()))
            return
        self._put(_END)

    def _put(self, item: _Queued) -> bool:
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            pass
        else:
            if self.queue.qsize() == 1:  # it was empty: the run loop may be waiting for it
                self.poke()
            return True
        while not self.closed:  # full: the run loop drains it, and will want to hear of more
            try:
                self.queue.put(item, timeout=PUT_POLL)
            except queue.Full:
                continue
            self.poke()
            return True
        return False

    def __iter__(self) -> Feed:
        return self

    def __next__(self) -> Item | Empty:
        try:
            item = self.queue.get_nowait()
        except queue.Empty:
            return EMPTY
        if item is _END:
            raise StopIteration
        if isinstance(item, SourceFailed):
            raise item
        return item

    def close(self) -> None:
        """Stop reading (a source blocked in a call stays blocked: its thread is a daemon)."""
        self.closed = True


def merge(source: Iterator[Item | Empty], journal: JournalWriter) -> Iterator[Merged | Empty]:
    """(index, payload, recorded status) for each (index, payload), checking recorded
    fingerprints; EMPTY passes through.

    A resume checks the source against the journal as it streams (a callable source is called
    once, and a generator cannot be read twice): a change raises SourceChangedError there."""
    recorded = journal.recorded()
    current = next(recorded, None)
    for item in source:
        if item is EMPTY:
            yield EMPTY
            continue
        index, payload = item
        while current is not None and current[0] < index:
            current = next(recorded, None)
        if current is not None and current[0] == index and current[2] is not None:
            if current[1] != fingerprint(payload):
                raise SourceChangedError(journal.path, index)
            yield index, payload, current[2]
        else:
            yield index, payload, None


def length(source: Any) -> int | None:
    """``len(source)``, or None for a source without one (a generator)."""
    try:
        return len(source)
    except TypeError:
        return None
