"""The descriptors the supervisor's loop sleeps on: its wakeup pipe, and per worker the
channel (readable; writable while frames wait) and the sentinel (readable once it is dead).

A supervisor hosted on an event loop (hosting.py) has them in an epoll set instead of a
poll() list: the set's own descriptor turns readable when one of them does, so the event loop
watches that one descriptor for all of them."""

from __future__ import annotations

import select
from typing import Any, Generic, Protocol, TypeVar

from .backends import WorkerHandle

READABLE = select.POLLIN | select.POLLHUP | select.POLLERR | select.POLLNVAL


class Watched(Protocol):
    """A worker as the loop knows it: what poll() reports is handed back as this."""

    @property
    def proc(self) -> WorkerHandle: ...


W = TypeVar("W", bound=Watched)


class Watch(Generic[W]):
    def __init__(self, wakeup_fd: int) -> None:
        self._poll: Any = select.poll()
        self._readable, self._writable = READABLE, select.POLLOUT
        self._epoll = False
        self._wakeup = wakeup_fd
        self._poll.register(wakeup_fd, READABLE)
        self._fds: dict[int, tuple[bool, W]] = {}  # fd -> (is its sentinel, worker)
        self._writing: set[int] = set()  # channels watched for room to write

    def pollable(self) -> int:
        """A descriptor that turns readable whenever one of the watched ones does (an epoll
        set's); before any worker is added. Linux only."""
        assert not self._fds, "pollable() comes before the first worker"
        self._poll = select.epoll()
        self._epoll = True
        self._readable = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
        self._writable = select.EPOLLOUT
        self._poll.register(self._wakeup, self._readable)
        return int(self._poll.fileno())

    def close(self) -> None:
        if self._epoll:
            self._poll.close()

    def add(self, worker: W) -> None:
        proc = worker.proc
        for fd, is_sentinel in ((proc.channel.fileno(), False), (proc.sentinel, True)):
            self._fds[fd] = (is_sentinel, worker)
            self._poll.register(fd, self._readable)

    def remove(self, worker: W) -> None:
        """Before its descriptors close (reap)."""
        self.forget(worker.proc.channel.fileno())
        self.forget(worker.proc.sentinel)

    def forget(self, fd: int) -> None:
        """Stop watching one descriptor: a channel at EOF would be reported again and again."""
        if self._fds.pop(fd, None) is not None:
            try:
                self._poll.unregister(fd)
            except OSError:  # epoll: closed already, and dropped from the set with it
                pass
            self._writing.discard(fd)

    def want_write(self, worker: W, wants: bool) -> None:
        fd = worker.proc.channel.fileno()
        if wants == (fd in self._writing) or fd not in self._fds:
            return
        if wants:
            self._writing.add(fd)
            self._poll.modify(fd, self._readable | self._writable)
        else:
            self._writing.discard(fd)
            self._poll.modify(fd, self._readable)

    def wait(self, timeout_ms: int | None) -> tuple[bool, list[W], list[W], list[W]]:
        """(woken, workers with something to read, with room to write, dead)."""
        woken = False
        readable: list[W] = []
        writable: list[W] = []
        dead: list[W] = []
        if self._epoll:  # its timeout is in seconds, -1 for none
            events = self._poll.poll(-1 if timeout_ms is None else timeout_ms / 1000)
        else:
            events = self._poll.poll(timeout_ms)
        for fd, mask in events:
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
            if mask & self._writable:
                writable.append(worker)
            if mask & self._readable:
                readable.append(worker)
        return woken, readable, writable, dead
