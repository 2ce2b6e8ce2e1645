"""The jobs a server accepted, around one Pool: admission, waiting, lookup, cancellation, drain.

Threads meet here, under one lock: the event loop's (requests; and the pool's supervisor,
which resolves futures, runs there too, see hosting.py), the journal's writer, and a drain's.
A job is *live* from its admission until its result is published; the live count is what
``--max-queue`` bounds (it is the pool's queued + in_flight, plus the few jobs between the
journal and the pool), so a refused request never leaves a trace, and an accepted one always
gets a result. Finished results stay in memory, the newest ``keep`` of them; with a journal,
older ones are read back from it.

A client that stops waiting changes nothing: waiting is a future of the event loop that the
job's completion resolves, never the job's own future, so dropping it cannot cancel the job.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import OrderedDict
from typing import Any, cast

from ..errors import PoolBroken, PoolClosed
from ..futures import JobFuture
from ..journal import JournalError
from ..pool import Pool
from .final import Final
from .store import ServeJournal

log = logging.getLogger("batchpool")

KEEP = 10_000  # finished results kept in memory (without a journal: all that stay queryable)


class Refused(Exception):
    """A job not accepted; nothing of it was kept."""


class Full(Refused):
    def __init__(self, live: int, limit: int) -> None:
        super().__init__(f"queue full: {live} jobs queued or running (--max-queue {limit})")


class Draining(Refused):
    def __init__(self) -> None:
        super().__init__("the server is shutting down")


class Unavailable(Refused):
    """The pool stopped working, or the journal cannot record the job."""


class Live:
    """An accepted job until its result is published."""

    __slots__ = ("id", "future", "final", "waiters", "deleted")

    def __init__(self, id: int) -> None:
        self.id = id
        self.future: JobFuture | None = None  # None until the pool has it
        self.final: Final | None = None
        self.waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[Final]]] = []
        self.deleted = False  # cancelled by a client (not by a hard stop)


class Service:
    def __init__(
        self, pool: Pool, *, max_queue: int, journal: ServeJournal | None = None, keep: int = KEEP
    ) -> None:
        self.pool = pool
        self.max_queue = max_queue
        self.journal = journal
        self.keep = keep
        self.lock = threading.Lock()
        self.live: dict[int, Live] = {}
        self.done: OrderedDict[int, Final] = OrderedDict()
        self.next_id = 1 + (journal.last_id if journal is not None else 0)
        self.draining = False

    # -- admission ---------------------------------------------------------------------------
    def resume(self) -> int:
        """Queue the jobs the journal accepted earlier and holds no result for; how many."""
        if self.journal is None:
            return 0
        count = 0
        for job in self.journal.unfinished():
            live = Live(job.id)
            self.live[job.id] = live
            self._queue(live, job.payload, job.priority)
            count += 1
        return count

    def admissible(self) -> None:
        """Raise what submit() would raise now for want of room (without the lock: a hint)."""
        if self.draining:
            raise Draining()
        if len(self.live) >= self.max_queue:
            raise Full(len(self.live), self.max_queue)

    async def submit(self, payload: Any, priority: int | None = None) -> Live:
        """Accept a job: recorded (with a journal), then queued. Raises Refused, keeping
        nothing, when the queue is full, the server drains, or the job cannot be recorded or
        queued."""
        with self.lock:
            self.admissible()
            live = Live(self.next_id)
            self.next_id += 1
            self.live[live.id] = live
        try:
            if self.journal is not None:
                await self._journaled(self.journal.accept, live.id, json.dumps(payload), priority)
            try:
                self._queue(live, payload, priority)
            except (PoolBroken, PoolClosed) as exc:
                if self.journal is not None:
                    await self._journaled(self.journal.forget, live.id)
                raise Unavailable(f"the pool cannot take jobs: {exc}") from None
        except BaseException:
            with self.lock:
                self.live.pop(live.id, None)
            raise
        return live

    async def _journaled(self, write: Any, *args: Any) -> None:
        """A journal write, once committed (Unavailable if it cannot be)."""
        loop = asyncio.get_running_loop()
        committed: asyncio.Future[None] = loop.create_future()

        def done(error: JournalError | None) -> None:
            loop.call_soon_threadsafe(_settle, committed, error)

        try:
            write(*args, done)
        except JournalError as exc:  # closed: the server is stopping
            raise Unavailable(str(exc)) from None
        try:
            await committed
        except JournalError as exc:
            raise Unavailable(str(exc)) from None

    def _queue(self, live: Live, payload: Any, priority: int | None) -> None:
        future = self.pool.submit(payload, priority=priority)
        live.future = future
        # By id, not by the Live: a callback holding the Live that holds the future would make
        # a cycle per job, for the cyclic GC to pause the server over.
        id = live.id
        future.add_done_callback(lambda f: self._finished(id, cast(JobFuture, f)))

    # -- results -----------------------------------------------------------------------------
    def _finished(self, id: int, future: JobFuture) -> None:
        """The job's future resolved (supervisor thread, or the canceller's)."""
        with self.lock:
            live = self.live.get(id)  # until _publish, below
        if live is None:
            return  # refused after all (see submit)
        if future.cancelled() and not live.deleted:
            return  # a hard stop's: not a result (with a journal, a restart runs the job)
        final = Final.of(live.id, future, future.attempts)
        if self.journal is None:
            self._publish(live, final)
            return

        def recorded(error: JournalError | None) -> None:
            if error is not None:
                log.error("%s; job %d is answered but not recorded", error, live.id)
            self._publish(live, final)

        try:
            self.journal.finish(final, recorded)
        except JournalError as exc:  # closed under a hard stop
            recorded(exc)

    def _publish(self, live: Live, final: Final) -> None:
        with self.lock:
            live.final = final
            self.live.pop(live.id, None)
            self.done[live.id] = final
            if len(self.done) > self.keep:
                self.done.popitem(last=False)
            waiters, live.waiters = live.waiters, []
        for loop, waiter in waiters:
            try:
                loop.call_soon_threadsafe(_settle, waiter, final)
            except RuntimeError:  # the loop has closed: nobody waits any more
                pass

    async def wait(self, live: Live) -> Final:
        """The job's result once published. Cancelling this wait leaves the job alone."""
        loop = asyncio.get_running_loop()
        with self.lock:
            if live.final is not None:
                return live.final
            waiter: asyncio.Future[Final] = loop.create_future()
            live.waiters.append((loop, waiter))
        return await waiter

    # -- lookup and cancellation -------------------------------------------------------------
    def lookup(self, id: int) -> Final | str | None:
        """The job's result, its state ("queued", "running", "retrying") before that, or
        None for an id never given out (or forgotten: without a journal, beyond ``keep``)."""
        with self.lock:
            live = self.live.get(id)
            final = self.done.get(id)
        if live is not None:
            return live.final or self.state(live)
        if final is not None:
            return final
        if self.journal is not None and 0 < id < self.next_id:
            return self.journal.lookup(id)
        return None

    def state(self, live: Live) -> str:
        future = live.future
        if future is not None and future.running():
            return "running"
        return "retrying" if future is not None and future.attempts else "queued"

    def cancel(self, id: int) -> Live | str | None:
        """Cancel a job that has not started: its Live (the result follows), or why not
        ("running", "final", "queued" while it is being recorded), or None for an unknown
        id. A job waiting for its retry has not started its next attempt: it is cancelled."""
        with self.lock:
            live = self.live.get(id)
        if live is None:
            return None if self.lookup(id) is None else "final"
        future = live.future
        if future is None:
            return "queued"
        live.deleted = True
        if future.cancel():
            return live
        live.deleted = False
        return "final" if future.done() else self.state(live)

    # -- state of the whole ------------------------------------------------------------------
    def health(self) -> dict[str, int]:
        m = self.pool.metrics()
        return {"workers": m.workers, "queued": m.queued, "in_flight": m.in_flight}

    def begin_drain(self) -> None:
        """Refuse new jobs from now on; accepted ones still run."""
        with self.lock:
            self.draining = True

    def drain(self) -> None:
        """Run every accepted job to its end, record the results, stop the workers (blocks)."""
        self.begin_drain()
        self.pool.close()
        if self.journal is not None:
            self.journal.close()

    def terminate(self) -> None:
        """Stop now: workers killed, unfinished jobs left unfinished (blocks until done)."""
        self.begin_drain()
        self.pool.terminate()
        if self.journal is not None:
            self.journal.close()


def _settle(waiter: asyncio.Future[Any], outcome: Any) -> None:
    """Resolve a loop future from its loop (a JournalError outcome raises there)."""
    if waiter.done():
        return
    if isinstance(outcome, BaseException):
        waiter.set_exception(outcome)
    else:
        waiter.set_result(outcome)
