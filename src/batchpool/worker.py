"""The local worker process: jobs from one pipe, results on the same pipe.

Never imports the supervisor. What a worker decides on its own (start-up, job semantics,
retirement, teardown) lives in workercore.py, shared with the Ray actor; this module is the
local transport around it: signals and the process group, the lifeline to the supervisor's
process, a mailbox thread that drains the pipe and answers STEAL and FLUSH, the shared progress
slots.
"""

from __future__ import annotations

import faulthandler
import os
import resource
import signal
import struct
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import NoReturn

from .backends import WorkerSpec
from .channel import IOV_MAX, frame_header, written
from .messages import (
    EXITING,
    FLUSH,
    FLUSHED,
    RESULTS,
    RETURNED,
    RUN,
    STEAL,
    STOP,
    ProgressSlots,
    Runs,
    dumps,
    loads,
    results_frame,
    run_ids,
)
from .processes import GROUP_SIGNALS
from .rates import Gate, GateSpec, open_gates
from .task import Task
from .workercore import EXIT_START_FAILED, Job, Retirement, Runner, start, stop

EXIT_ORPHANED = 4  # the supervisor's process died


def main(
    conn: Connection,
    lifeline: Connection,
    progress: ProgressSlots,
    slot: int,
    spec: WorkerSpec,
    gates: Sequence[GateSpec],
) -> None:
    """Entry point of a worker process (the target of multiprocessing.Process)."""
    _ignore_group_signals()
    # A group of its own: whatever its tasks start can be killed with it as one (kill_tree,
    # sweep_group), even after the worker itself is gone.
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    faulthandler.enable()
    _exit_with_parent(lifeline)
    if spec.tuning.nice:
        os.nice(spec.tuning.nice)
    tasks, hello = start(spec.tasks_blob, spec.preload)
    try:
        _send(conn, hello)
        if tasks is not None:
            retirement = Retirement(spec.max_tasks, spec.max_memory)
            gated = open_gates(gates)
            _serve(conn, tasks, progress, slot, retirement, gated, spec.tuning.flush_every)
    except OSError:  # the supervisor's end of the pipe is gone, and the supervisor with it
        _orphaned()
    if tasks is None:
        _exit(EXIT_START_FAILED)
    stop(tasks)
    _exit(0)


def _ignore_group_signals() -> None:
    """The supervisor owns Ctrl-C, SIGTERM and SIGHUP: in-flight attempts must be able to
    finish while it drains. They arrive blocked (processes.block_group_signals), so none can
    strike before they are ignored here.

    Ignored by a handler that does nothing, not by SIG_IGN: an ignored signal stays ignored
    across exec, so every program a task started (a subprocess, the workers of a
    multiprocessing pool) ignored SIGTERM as well, and its ``terminate()`` then waited
    forever. exec resets a handler; a child forked without exec gets the defaults back at
    fork, with the signals blocked until then, so that a ``terminate()`` right after the
    fork still ends it. SA_RESTART (``siginterrupt(sig, False)``): a system call that the
    signal meets in C code is restarted, not failed with EINTR.
    """
    for sig in GROUP_SIGNALS:
        signal.signal(sig, _ignored)
        signal.siginterrupt(sig, False)
    os.register_at_fork(
        before=_block_for_fork, after_in_parent=_unblock, after_in_child=_defaults_in_child
    )
    signal.pthread_sigmask(signal.SIG_UNBLOCK, GROUP_SIGNALS)


def _ignored(signum: int, frame: object) -> None:
    pass


_forking = threading.local()  # the forking thread's signal mask, from before the fork


def _block_for_fork() -> None:
    _forking.mask = signal.pthread_sigmask(signal.SIG_BLOCK, GROUP_SIGNALS)


def _unblock() -> None:
    signal.pthread_sigmask(signal.SIG_SETMASK, _forking.mask)


def _defaults_in_child() -> None:
    """In a process a task forked: the dispositions of any Python process's child."""
    for sig in GROUP_SIGNALS:
        default = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
        signal.signal(sig, default)
    _unblock()


def _exit(code: int) -> NoReturn:
    """Leave now, and take along whatever the tasks started.

    ``os._exit``: returning to multiprocessing would join the non-daemon threads a task left
    running, and a worker must not outlive its stop because of them. Children that left the
    worker's process group are killed here; the group itself is swept by the supervisor.
    """
    try:
        os.waitpid(-1, os.WNOHANG)  # ChildProcessError: no children, nothing to find
        import psutil

        for child in psutil.Process().children(recursive=True):
            try:
                child.kill()
            except psutil.Error:
                pass
    except (ChildProcessError, ImportError):
        pass
    except Exception as exc:  # psutil failing must not keep the worker alive
        print(f"batchpool worker {os.getpid()}: {exc!r}", file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def _exit_with_parent(lifeline: Connection) -> None:
    """Exit when the supervisor's process dies, whatever it was running.

    Nobody ever writes to the lifeline; only the supervisor's process holds its write end, so
    the read end becomes readable (EOF) exactly when that process is gone -- under fork,
    forkserver and spawn alike. A thread watches it so a job stuck in C code cannot delay it.
    """

    def watch() -> None:
        try:
            wait([lifeline])
        finally:
            _orphaned()

    threading.Thread(target=watch, name="batchpool-lifeline", daemon=True).start()


def _orphaned() -> NoReturn:
    """Nobody will read our results: end this worker and what its tasks started, at once."""
    try:
        os.killpg(0, signal.SIGKILL)
    finally:
        os._exit(EXIT_ORPHANED)


def _send(conn: Connection, message: tuple[object, ...]) -> None:
    conn.send_bytes(dumps(message))


def _serve(
    conn: Connection,
    tasks: list[Task],
    progress: ProgressSlots,
    slot: int,
    retirement: Retirement,
    gates: dict[int, Gate],
    flush_every: float,
) -> None:
    box = _Mailbox(conn)
    runner = Runner(
        tasks, box.send, retirement, progress, slot, flush_every, gates, out_of_band=True
    )
    threading.Thread(
        target=box.read, args=(runner.flush_finished,), name="batchpool-reader", daemon=True
    ).start()
    while (message := box.next()) is not None:  # None: STOP, or the supervisor's end closed
        _, runs, blob, buffers = message
        # Unpacked jobs wait in the mailbox, where STEAL can still hand them back.
        box.jobs.extend(runner.unpack(runs, blob, buffers))
        if runner.run_batch(box.jobs):
            break
    try:
        box.send((EXITING, _peak_rss()))
    except OSError:
        pass  # the supervisor's end is closed: nobody to tell


def _peak_rss() -> int:
    """Bytes (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# A RUN message in the mailbox, not unpacked yet: (RUN, runs, payloads blob, the payloads
# sent out of band)
_Pending = tuple[int, Runs, bytearray, list[bytes | bytearray]]


class _Mailbox:
    """Messages received and jobs not started, shared by the main thread and the reader thread.

    The reader thread always drains the pipe, so the supervisor can queue the next batch while
    this worker is busy without ever blocking on a full pipe; and it answers STEAL and FLUSH at
    once, even while run() is inside C code (that releases the GIL): STEAL hands back jobs that
    wait behind a long one, FLUSH sends the results of the jobs that ended before it.

    ``pending``: RUN messages not unpacked yet (under ``cond``). ``jobs``: the unpacked jobs
    of the batch under way; the main thread takes them from the left, STEAL from the right,
    each pop atomic, so a job that has started is never handed back, with no lock per job.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.cond = threading.Condition(threading.Lock())
        self.pending: deque[_Pending] = deque()
        self.jobs: deque[Job] = deque()
        self.ended = False
        self.send_lock = threading.Lock()

    def send(self, message: tuple[object, ...]) -> None:
        if message[0] == RESULTS and type(message[4]) is tuple:  # values out of band
            parts = results_frame(message)  # type: ignore[arg-type]
            with self.send_lock:
                _write_frame(self.conn.fileno(), parts)
            return
        blob = dumps(message)
        with self.send_lock:
            self.conn.send_bytes(blob)

    def read(self, flush_finished: Callable[[], None]) -> None:
        """The reader thread: ``flush_finished`` sends the results not sent yet (FLUSH)."""
        while True:
            try:
                message = loads(self.conn.recv_bytes())
                if message[0] == RUN:  # its payloads follow as a frame, then its buffers
                    blob = _read_frame(self.conn)
                    kinds = message[2] if len(message) > 2 else b""
                    buffers = [_read_buffer(self.conn, writable) for writable in kinds]
                    message = (RUN, message[1], blob, buffers)
            except (EOFError, OSError):
                message = (STOP,)
            if message[0] == RUN:
                with self.cond:
                    self.pending.append(message)
                    self.cond.notify()
            elif message[0] == STEAL:
                self._give_back()
            elif message[0] == FLUSH:
                flush_finished()
                self.send((FLUSHED,))
            else:
                with self.cond:
                    self.ended = True
                    self.cond.notify()
                return

    def _give_back(self) -> None:
        with self.cond:
            messages = list(self.pending)
            self.pending.clear()
        stolen: list[int] = []
        take = self.jobs.pop
        while True:
            try:
                stolen.append(take()[0])
            except IndexError:
                break
        stolen.reverse()
        for message in messages:
            stolen += run_ids(message[1])
        self.send((RETURNED, stolen))

    def next(self) -> _Pending | None:
        """The next RUN message; None once stopped."""
        with self.cond:
            while not self.pending:
                if self.ended:
                    return None
                self.cond.wait()
            return self.pending.popleft()


def _write_frame(fd: int, parts: list[bytes | memoryview]) -> None:
    """``parts`` as one frame (Connection's framing), written as they are: a blocking
    writev may still take part of them (a signal), so it goes on until all is written."""
    out = [frame_header(sum(len(part) for part in parts)), *parts]
    while out:
        written(out, os.writev(fd, out[:IOV_MAX]))


def _read_frame(conn: Connection) -> bytearray:
    """``conn.recv_bytes()`` with one copy instead of three: megabytes of payload go from
    the kernel straight into the buffer that pickle then reads (same framing as Connection:
    a big-endian int32 length, or -1 and a uint64 length)."""
    fd = conn.fileno()
    return _read_exact(fd, _frame_size(fd))


def _read_buffer(conn: Connection, writable: int) -> bytes | bytearray:
    """One frame sent out of band: a ``bytearray`` where the payload needs it writable, else
    ``bytes`` (the task gets that very object), read whole when the pipe holds it all (one
    copy), else in parts, joined."""
    fd = conn.fileno()
    size = _frame_size(fd)
    if writable:
        return _read_exact(fd, size)
    parts = []
    while size:
        part = os.read(fd, size)
        if not part:
            raise EOFError("the supervisor's end of the pipe closed")
        parts.append(part)
        size -= len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _frame_size(fd: int) -> int:
    (size,) = struct.unpack("!i", _read_exact(fd, 4))
    if size == -1:
        (size,) = struct.unpack("!Q", _read_exact(fd, 8))
    return int(size)


def _read_exact(fd: int, size: int) -> bytearray:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = os.readv(fd, [view[got:]])
        if n == 0:
            raise EOFError("the supervisor's end of the pipe closed")
        got += n
    return buf
