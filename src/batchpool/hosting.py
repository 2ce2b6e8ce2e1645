"""A supervisor hosted on an asyncio event loop instead of a thread of its own (``serve``).

A server's front is an event loop. With the supervisor in a thread of its own, every
accepted job crossed between the two threads twice (its submit, its result), each crossing a
wakeup of a thread on a busy core, and each pass of the supervisor took the GIL from the
loop, which then answered nothing, refusals included, until it got it back. Hosted, the
passes are callbacks of the loop itself.

The watched descriptors sit in one epoll set (``Watch.pollable``), and the loop watches that
set's descriptor: a pass runs when a worker or a command is ready, when the supervisor's next
timer is due, or at once when commands wait. The loop's thread is then the supervisor's thread:
waiting there for the pool's jobs is refused, as in a done-callback
(``futures.refuse_to_wait_in_callback``), since nothing would make the passes it waits for.

If the event loop ends before the supervisor is done (a server that stops, or fails to start),
``detach()`` hands the supervisor to a thread of its own, which finishes its work as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

from .registry import LIVE
from .supervisor import Supervisor


class Host:
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.loop: asyncio.AbstractEventLoop | None = None
        self.fd = -1
        self.timer: asyncio.Handle | None = None
        self.detached = False

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the supervisor on ``loop``, from the loop's thread."""
        sup = self.supervisor
        self.loop = loop
        self.fd = sup.watch.pollable()
        sup.thread = threading.current_thread()
        LIVE.add(sup)
        try:
            sup.begin()
        except BaseException as exc:
            sup.failed(exc)
            sup.finish()
            return
        loop.add_reader(self.fd, self._pass)
        self._schedule()

    def detach(self) -> None:
        """The event loop has ended or will not run: a thread of its own finishes the
        supervisor's work (or starts it, if it was never attached)."""
        if self.detached:
            return
        self.detached = True
        sup = self.supervisor
        if sup.done.is_set():
            return
        self._release()
        sup.start()

    def _pass(self) -> None:
        if self.detached:
            return
        sup = self.supervisor
        try:
            done = sup.step(0)
        except BaseException as exc:
            sup.failed(exc)
            done = True
        if done:
            self._release()
            self.detached = True
            sup.finish()
            return
        self._schedule()

    def _schedule(self) -> None:
        """The next pass: when the supervisor's next timer is due, or now if commands wait
        (a descriptor that turns readable meanwhile brings one sooner)."""
        assert self.loop is not None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        ms = self.supervisor.wait_ms()
        if ms == 0:
            self.timer = self.loop.call_soon(self._pass)
        elif ms is not None:
            self.timer = self.loop.call_later(ms / 1000, self._pass)

    def _release(self) -> None:
        """Off the event loop (which may be closed already)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.loop is not None:
            with contextlib.suppress(RuntimeError, ValueError, OSError):
                self.loop.remove_reader(self.fd)
