"""Commands for the supervisor's loop from any thread, and the pipe that wakes it.

The loop sleeps in poll(); a command is appended to a deque and, unless a wakeup is already
pending, one byte is written to a pipe the loop polls. Two rules keep every command seen:

- post() writes the byte *before* it sets the pending flag, so an exception between the two
  (a second Ctrl-C raised in the main thread) leaves the flag clear and the next post writes;
- the loop clears the flag and looks at the deque right before each sleep (``timeout_ms``),
  so a flag left set after the byte was consumed cannot hide a later command.

A command that may wait (a server's submit, while every worker holds jobs) writes no byte
when the loop said it is ``quiet``: it will pass again soon on its own (a worker's report), and
it never sleeps longer than a bound then.

After ``close()`` nothing is accepted: post() says so, and ``leftovers()`` hands back what
came in between the loop's last look and the close. What a command is, is the loop's business:
``Commands[C]`` carries commands of type C.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from typing import Generic, TypeVar

C = TypeVar("C")


class Commands(Generic[C]):
    def __init__(self) -> None:
        self._queue: deque[C] = deque()
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        self._pending = False
        self._quiet = False  # a pass is due anyway: posts that may wait write no byte
        self._lock = threading.Lock()  # the pipe is closed under it: no write to a reused fd
        self._closed = False

    def fileno(self) -> int:
        return self._r

    def post(self, command: C, *, urgent: bool = True) -> bool:
        """Queue a command; False once closed (nothing will run it). One that is not
        ``urgent`` wakes the loop only when it is not ``quiet`` (see ``set_quiet``)."""
        with self._lock:
            if self._closed:
                return False
            self._queue.append(command)
            if not self._pending and (urgent or not self._quiet):
                try:
                    os.write(self._w, b"!")
                except OSError:
                    pass  # full: a wakeup is pending anyway
                self._pending = True
        return True

    def woken(self) -> None:
        """The pipe was readable: empty it."""
        os.read(self._r, 4096)

    def set_quiet(self, quiet: bool) -> None:
        """Before ``sleep_allowed``: whether the loop will pass again soon on its own (and
        sleeps a bounded time), so posts that are not urgent need not wake it."""
        with self._lock:
            self._quiet = quiet

    def sleep_allowed(self) -> bool:
        """Right before the loop sleeps: clear the flag; False if commands wait. Under the
        lock: a post() whose byte the loop has consumed already must not set the flag after
        this clears it, or the next post() would write no byte and the loop sleep through it."""
        with self._lock:
            self._pending = False
            return not self._queue

    def __bool__(self) -> bool:
        return bool(self._queue)

    def pop(self) -> C | None:
        return self._queue.popleft() if self._queue else None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            os.close(self._r)
            os.close(self._w)

    def leftovers(self) -> list[C]:
        """Commands posted but never run (after close)."""
        left = list(self._queue)
        self._queue.clear()
        return left
