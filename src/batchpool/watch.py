"""The descriptors the supervisor's loop sleeps on: its wakeup pipe, and per worker the
channel (readable; writable while frames wait) and the sentinel (readable once it is dead)."""

from __future__ import annotations

import select
from typing import Generic, Protocol, TypeVar

from .backends import WorkerHandle

READABLE = select.POLLIN | select.POLLHUP | select.POLLERR | select.POLLNVAL


class Watched(Protocol):
    """A worker as the loop knows it: what poll() reports is handed back as this."""

    @property
    def proc(self) -> WorkerHandle: ...


W = TypeVar("W", bound=Watched)


class Watch(Generic[W]):
    def __init__(self, wakeup_fd: int) -> None:
        self._poll = select.poll()
        self._wakeup = wakeup_fd
        self._poll.register(wakeup_fd, READABLE)
        self._fds: dict[int, tuple[bool, W]] = {}  # fd -> (is its sentinel, worker)
        self._writing: set[int] = set()  # channels watched for room to write

    def add(self, worker: W) -> None:
        proc = worker.proc
        for fd, is_sentinel in ((proc.channel.fileno(), False), (proc.sentinel, True)):
            self._fds[fd] = (is_sentinel, worker)
            self._poll.register(fd, READABLE)

    def remove(self, worker: W) -> None:
        """Before its descriptors close (reap)."""
        self.forget(worker.proc.channel.fileno())
        self.forget(worker.proc.sentinel)

    def forget(self, fd: int) -> None:
        """Stop watching one descriptor: a channel at EOF would be reported again and again."""
        if self._fds.pop(fd, None) is not None:
            self._poll.unregister(fd)
            self._writing.discard(fd)

    def want_write(self, worker: W, wants: bool) -> None:
        fd = worker.proc.channel.fileno()
        if wants == (fd in self._writing) or fd not in self._fds:
            return
        if wants:
            self._writing.add(fd)
            self._poll.modify(fd, READABLE | select.POLLOUT)
        else:
            self._writing.discard(fd)
            self._poll.modify(fd, READABLE)

    def wait(self, timeout_ms: int | None) -> tuple[bool, list[W], list[W], list[W]]:
        """(woken, workers with something to read, with room to write, dead)."""
        woken = False
        readable: list[W] = []
        writable: list[W] = []
        dead: list[W] = []
        for fd, mask in self._poll.poll(timeout_ms):
            if fd == self._wakeup:
                woken = True
                continue
            entry = self._fds.get(fd)
            if entry is None:
                continue
            is_sentinel, worker = entry
            if is_sentinel:
                dead.append(worker)
                continue
            if mask & select.POLLOUT:
                writable.append(worker)
            if mask & READABLE:
                readable.append(worker)
        return woken, readable, writable, dead
