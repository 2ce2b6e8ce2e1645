"""Workers as local processes (multiprocessing, under fork, forkserver or spawn)."""

from __future__ import annotations

import multiprocessing
import os
import socket
from collections.abc import Sequence
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.context import ForkContext, ForkServerContext, SpawnContext

from .. import worker
from ..channel import Channel
from ..messages import IDLE, ProgressSlots, progress_slot
from ..processes import (
    block_group_signals,
    group_signals_blocked,
    kill_tree,
    lifeline,
    start_forkserver_ignoring_signals,
    start_forkserver_plainly,
    sweep_group,
    watch_pid,
)
from ..rates import GateFiles, GateSpec
from . import WorkerSpec

REAP_WAIT = 2.0  # seconds for the exit status of a dead worker (the forkserver reports it)
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

Context = ForkContext | ForkServerContext | SpawnContext


def _context(start_method: str) -> Context:
    """The start method's own context (the Pool checked the name): only those start
    processes, not the BaseContext that ``get_context`` is typed to return."""
    ctx = multiprocessing.get_context(start_method)
    assert isinstance(ctx, (ForkContext, ForkServerContext, SpawnContext))
    return ctx


class LocalBackend:
    """Starts worker processes; owns the shared array of their progress slots."""

    chunksize = None  # any batch size: a worker's progress slot names the job it runs
    batch_deadline = False  # so each job's timeout runs from that job's start

    def __init__(self, start_method: str, procs: int, spec: WorkerSpec) -> None:
        self.ctx = _context(start_method)
        self.forkserver = start_method == "forkserver"
        if start_method != "fork":
            # Spawned workers need multiprocessing's resource tracker, and starting it
            # unblocks SIGINT and SIGTERM in the starting thread: not in the supervisor's.
            resource_tracker.ensure_running()
        if self.forkserver:
            # Workers import batchpool, the main script and the pipeline files from the server
            # once, not once each.
            self.ctx.set_forkserver_preload(["__main__", "batchpool.worker", "batchpool.preload"])
        self.spec = spec
        if self.forkserver:  # here, in the caller's thread (see processes._preloading)
            self._start_forkserver(spec.preload)
        # Two int64 per worker, written by the worker without a lock: nothing a killed
        # worker held can wedge the supervisor.
        self.progress: ProgressSlots = self.ctx.RawArray("q", 2 * procs)
        self.gates = GateFiles(spec.rates)
        self.slots = procs

    def start_worker(self, slot: int) -> LocalWorker:
        if slot >= self.slots:  # a pool resized past its size: a larger array for the new
            self.slots = slot + 1  # (the workers started before keep theirs)
            self.progress = self.ctx.RawArray("q", 2 * self.slots)
        # A worker starts with the group's signals blocked (worker.main); the calling thread
        # gets its own mask back after (an event loop's thread must go on receiving them).
        with group_signals_blocked():
            if self.forkserver:  # restarted if it died (its workers then import for themselves)
                self._start_forkserver(None)
            block_group_signals()  # again: a resource tracker restarted here unblocked them
            return LocalWorker(self.ctx, slot, self.progress, self.spec, self.gates.specs)

    def _start_forkserver(self, files: Sequence[tuple[str, str]] | None) -> None:
        if self.spec.own_signals:  # immune to group signals
            start_forkserver_ignoring_signals(files)
        else:  # as multiprocessing would start it, not with our mask
            start_forkserver_plainly(files)

    def close(self) -> None:
        self.gates.remove()


SOCKET_BUFFER = 4 * 1024 * 1024  # bytes; the kernel caps it at net.core.[rw]mem_max


def _widen(*conns: Connection) -> None:
    """Let a whole batch of payloads fit in the socket: the supervisor's send then returns
    at once instead of waiting for this worker to read, and feeds the next worker."""
    for conn in conns:
        sock = socket.socket(fileno=os.dup(conn.fileno()))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        finally:
            sock.close()


class LocalWorker:
    """One worker process: its private duplex pipe (a killed worker breaks only its own), and
    its two slots of the backend's shared progress array. ``sentinel`` is a pidfd where the
    platform has one: readable when the process itself has exited."""

    __slots__ = (
        "slot",
        "proc",
        "conn",
        "channel",
        "sentinel",
        "pidfd",
        "pid",
        "progress",
        "statm",
    )
    flushes = True  # its mailbox thread answers FLUSH with the results it has not sent
    sends_buffers = True  # written to the pipe as they are
    exit_detail = None  # its exit code says it all

    def __init__(
        self,
        ctx: Context,
        slot: int,
        progress: ProgressSlots,
        spec: WorkerSpec,
        gates: tuple[GateSpec, ...],
    ) -> None:
        self.slot = slot
        self.progress = progress
        job_at, _ = progress_slot(slot)
        progress[job_at] = IDLE
        parent_end, child_end = ctx.Pipe(duplex=True)
        _widen(parent_end, child_end)
        self.proc = ctx.Process(
            target=worker.main,
            args=(
                child_end,
                lifeline(),
                progress,
                slot,
                spec,
                gates,
            ),
            name=f"batchpool-worker-{slot}",
        )
        try:
            self.proc.start()
        finally:
            child_end.close()
        self.conn = parent_end
        self.channel = Channel(parent_end.fileno())
        pid = self.proc.pid
        assert pid is not None  # started
        self.pid = pid
        self.pidfd = watch_pid(self.pid)
        self.sentinel = self.proc.sentinel if self.pidfd is None else self.pidfd
        self.statm = _open_statm(pid)

    def send(
        self, blob: bytes, payloads: bytes | None = None, buffers: Sequence[memoryview] = ()
    ) -> bool:
        """Queued, never blocking; False if the worker is gone (its sentinel will report the
        death)."""
        if payloads is None:
            return self.channel.send(blob)
        return self.channel.send(blob, payloads, *buffers)

    def running(self) -> tuple[int, float]:
        """The worker writes the start time, then the id: the id read again after the time
        tells whether both belong to the same job."""
        job_at, started_at = progress_slot(self.slot)
        progress = self.progress
        while True:
            job_id = progress[job_at]
            started = progress[started_at]
            if progress[job_at] == job_id:
                return job_id, started / 1e9

    def rss(self) -> int | None:
        """Linux: one read of the worker's /proc statm, opened at its start (~1.5 us; psutil
        costs ~30 us a sample and ~20 ms to import, which the supervisor would pay in the
        middle of a run). Elsewhere, psutil."""
        if self.statm is not None:
            try:
                return int(os.pread(self.statm, 128, 0).split()[1]) * PAGE_SIZE
            except (OSError, ValueError, IndexError):
                return None
        import psutil

        try:
            return psutil.Process(self.pid).memory_info().rss
        except psutil.Error:
            return None

    def kill(self) -> None:
        kill_tree(self.pid)

    def reap(self) -> int | None:
        """After the sentinel fired: make sure the worker and what it started are dead (a
        pipe sentinel also fires when only the forkserver died), then its exit status."""
        if self.pidfd is None:
            kill_tree(self.pid)
        sweep_group(self.pid)
        self.proc.join(timeout=REAP_WAIT)
        if self.proc.exitcode is None:  # not dead yet: make sure
            self.kill()
            self.proc.join(timeout=REAP_WAIT)
        code = self.proc.exitcode
        self.conn.close()
        for fd in (self.pidfd, self.statm):
            if fd is not None:
                os.close(fd)
        try:
            self.proc.close()
        except ValueError:  # still running: killed, but not collected in time
            pass
        self.progress[progress_slot(self.slot)[0]] = IDLE
        return code


def _open_statm(pid: int) -> int | None:
    """The worker's /proc statm, held open: a read answers for this very process, never for a
    later one given the same pid. None where there is no /proc."""
    try:
        return os.open(f"/proc/{pid}/statm", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
