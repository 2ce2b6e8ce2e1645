"""The worker process: run jobs from one pipe, report results on the same pipe.

Never imports the supervisor. The loop is deliberately small: everything a worker decides on
its own (retryable or not, retirement) is decided here against real objects; everything about
a job's fate is decided by the supervisor.
"""

from __future__ import annotations

import faulthandler
import importlib.util
import os
import resource
import signal
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from .messages import (
    ERROR,
    EXITING,
    FATAL,
    FLUSHING,
    IDLE,
    OK,
    READY,
    RESULTS,
    RETURNED,
    RUN,
    SPLIT,
    START_FAILED,
    STEAL,
    STOP,
    UNPACKING,
    UNPICKLABLE,
    dumps,
    error_tuple,
    loads,
    progress_slot,
)
from .processes import GROUP_SIGNALS
from .task import Task, is_retryable

EXIT_START_FAILED = 3  # task unpickling or setup() raised
EXIT_ORPHANED = 4  # the supervisor's process died
FLUSH_EVERY = 0.02  # seconds: a long batch still streams results (progress, ordered imap)
MEMORY_CHECK_EVERY = 0.05  # seconds: psutil RSS costs ~10 us, too much after every no-op job


def main(
    conn: Connection,
    lifeline: Connection,
    progress: Any,
    slot: int,
    tasks_blob: bytes,
    preload: Sequence[tuple[str, str]],
    max_tasks: int | None,
    max_memory: int | None,
) -> None:
    """Entry point of a worker process (the target of multiprocessing.Process)."""
    # The supervisor owns Ctrl-C, SIGTERM and SIGHUP: in-flight attempts must be able to
    # finish while it drains. They arrive blocked (processes.block_group_signals), so none can
    # strike before they are ignored here.
    for sig in GROUP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, GROUP_SIGNALS)
    # A group of its own: whatever its tasks start can be killed with it as one (kill_tree,
    # sweep_group), even after the worker itself is gone.
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    faulthandler.enable()
    _exit_with_parent(lifeline)
    try:
        _import_files(preload)
        tasks: list[Task] = loads(tasks_blob)
        for task in tasks:
            task.setup()
    except BaseException as exc:
        _send(conn, (START_FAILED, error_tuple(exc)))
        _exit(EXIT_START_FAILED)
    try:
        _send(conn, (READY, os.getpid()))
        _serve(conn, tasks, progress, slot, max_tasks, max_memory)
    except OSError:  # the supervisor's end of the pipe is gone, and the supervisor with it
        _orphaned()
    for task in tasks:
        try:
            task.teardown()
        except Exception as exc:
            print(f"batchpool worker {os.getpid()}: teardown failed: {exc!r}", file=sys.stderr)
    _exit(0)


def _exit(code: int) -> None:
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


def _orphaned() -> None:
    """Nobody will read our results: end this worker and what its tasks started, at once."""
    try:
        os.killpg(0, signal.SIGKILL)
    finally:
        os._exit(EXIT_ORPHANED)


def _import_files(preload: Sequence[tuple[str, str]]) -> None:
    """Import pipeline files by path under the module names the supervisor gave them, so task
    classes defined there unpickle under spawn and forkserver."""
    for name, path in preload:
        if name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


def _send(conn: Connection, message: tuple) -> None:
    conn.send_bytes(dumps(message))


def _serve(
    conn: Connection,
    tasks: list[Task],
    progress: Any,
    slot: int,
    max_tasks: int | None,
    max_memory: int | None,
) -> None:
    job_at, started_at = progress_slot(slot)
    rss = _rss_probe() if max_memory else None
    done = 0
    next_memory_check = 0.0
    monotonic = time.monotonic
    monotonic_ns = time.monotonic_ns
    box = _Mailbox(conn)
    threading.Thread(target=box.read, name="batchpool-reader", daemon=True).start()
    out = _Results()
    flushed = monotonic()
    while True:
        item = box.next()
        if item is None:
            break  # STOP (or the supervisor's end of the pipe closed)
        if item[0] is _MESSAGE:
            # A lone job refused here was answered: it spent its place in the quota.
            done += _unpack(box, item, progress, job_at, started_at)
            if max_tasks is not None and done >= max_tasks:
                _flush(out, box, "max_tasks_per_worker", progress, job_at, started_at)
                break
            continue
        _, job_id, stage, payload = item
        progress[started_at] = monotonic_ns()
        progress[job_at] = job_id
        outcome, elapsed, value = _run_one(tasks[stage], payload)
        out.add(job_id, outcome, elapsed, value)
        progress[job_at] = IDLE
        done += 1
        now = monotonic()
        retiring = None
        if max_tasks is not None and done >= max_tasks:
            retiring = "max_tasks_per_worker"
        elif rss is not None and now >= next_memory_check:
            next_memory_check = now + MEMORY_CHECK_EVERY
            if rss() > max_memory:
                retiring = "max_memory"
        if retiring:
            _flush(out, box, retiring, progress, job_at, started_at)
            break
        # A failure is reported at once: its backoff starts now, and a crash of a later job
        # of the batch cannot lose the record of this attempt.
        if outcome != OK or box.at_boundary() or now - flushed > FLUSH_EVERY:
            _flush(out, box, None, progress, job_at, started_at)
            out = _Results()
            flushed = now
    try:
        box.send((EXITING, _peak_rss()))
    except OSError:
        pass  # the supervisor's end is closed: nobody to tell


def _peak_rss() -> int:
    """Bytes (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _flush(
    out: _Results, box: _Mailbox, retiring: str | None, progress: Any, job_at: int, started_at: int
) -> None:
    """Send results; the slot says FLUSHING, so a death or hang in pickling is attributed."""
    progress[started_at] = time.monotonic_ns()
    progress[job_at] = FLUSHING
    out.send(box, retiring)
    progress[job_at] = IDLE


_MESSAGE = object()  # a RUN message not unpacked yet
_JOB = object()  # one job of an unpacked message


class _Mailbox:
    """Jobs received and not started, shared by the main thread and the reader thread.

    The reader thread always drains the pipe, so the supervisor can queue the next batch while
    this worker is busy without ever blocking on a full pipe; and it answers STEAL at once,
    handing back jobs that wait behind a long one, even while run() is inside C code.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.cond = threading.Condition(threading.Lock())
        self.items: deque[tuple] = deque()
        self.ended = False
        self.send_lock = threading.Lock()

    def send(self, message: tuple) -> None:
        blob = dumps(message)
        with self.send_lock:
            self.conn.send_bytes(blob)

    def read(self) -> None:
        while True:
            try:
                message = loads(self.conn.recv_bytes())
                if message[0] == RUN:  # its payloads follow as a frame of their own
                    message = (_MESSAGE, message[1], message[2], _read_frame(self.conn))
            except (EOFError, OSError):
                message = (STOP,)
            if message[0] is _MESSAGE:
                with self.cond:
                    self.items.append(message)
                    self.cond.notify()
            elif message[0] == STEAL:
                self._give_back()
            else:
                with self.cond:
                    self.ended = True
                    self.cond.notify()
                return

    def _give_back(self) -> None:
        with self.cond:
            items = list(self.items)
            self.items.clear()
        ids: list[int] = []
        for item in items:
            if item[0] is _MESSAGE:
                ids.extend(item[1])
            else:
                ids.append(item[1])
        self.send((RETURNED, ids))

    def next(self) -> tuple | None:
        with self.cond:
            while not self.items:
                if self.ended:
                    return None
                self.cond.wait()
            return self.items.popleft()

    def at_boundary(self) -> bool:
        """The jobs of one message are done: send their results now, so the supervisor sends
        the next batch while this worker runs the one it has queued (or goes idle)."""
        items = self.items
        return not items or items[0][0] is _MESSAGE

    def push_front(self, jobs: list[tuple]) -> None:
        with self.cond:
            self.items.extendleft(reversed(jobs))


def _read_frame(conn: Connection) -> bytearray:
    """``conn.recv_bytes()`` with one copy instead of three: megabytes of payload go from
    the kernel straight into the buffer that pickle then reads (same framing as Connection:
    a big-endian int32 length, or -1 and a uint64 length)."""
    fd = conn.fileno()
    (size,) = struct.unpack("!i", _read_exact(fd, 4))
    if size == -1:
        (size,) = struct.unpack("!Q", _read_exact(fd, 8))
    return _read_exact(fd, size)


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


def _unpack(box: _Mailbox, item: tuple, progress: Any, job_at: int, started_at: int) -> int:
    """Unpickle a RUN message's payloads into single jobs at the front of the mailbox; the
    number of jobs answered instead (a lone payload that did not unpickle: 1)."""
    _, ids, stages, blob = item
    # A crash or hang while unpickling a lone payload is charged to its job; in a batch the
    # supervisor reruns each job alone to find the culprit.
    progress[started_at] = time.monotonic_ns()
    progress[job_at] = ids[0] if len(ids) == 1 else UNPACKING
    try:
        payloads = loads(blob)
    except BaseException as exc:
        progress[job_at] = IDLE
        _refuse_batch(box, ids, exc)
        return 1 if len(ids) == 1 else 0
    progress[job_at] = IDLE
    box.push_front(
        [(_JOB, job_id, stage, p) for job_id, stage, p in zip(ids, stages, payloads, strict=True)]
    )
    return 0


def _refuse_batch(box: _Mailbox, ids: list[int], exc: BaseException) -> None:
    """The payloads did not unpickle: alone, the job is charged; in a batch, split it."""
    if len(ids) == 1:
        box.send((RESULTS, ids, [UNPICKLABLE], [0.0], dumps([error_tuple(exc)]), None))
    else:
        n = len(ids)
        box.send((RESULTS, ids, [SPLIT] * n, [0.0] * n, dumps([None] * n), None))


class _Results:
    """Results of one message, pickled together; an unpicklable value fails its job alone."""

    __slots__ = ("ids", "outcomes", "elapsed", "values")

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.outcomes: list[int] = []
        self.elapsed: list[float] = []
        self.values: list[Any] = []

    def add(self, job_id: int, outcome: int, elapsed: float, value: Any) -> None:
        self.ids.append(job_id)
        self.outcomes.append(outcome)
        self.elapsed.append(elapsed)
        self.values.append(value)

    def send(self, box: _Mailbox, retiring: str | None) -> None:
        try:
            blob = dumps(self.values)
        except BaseException:
            for i, value in enumerate(self.values):
                try:
                    dumps(value)
                except BaseException as exc:
                    self.outcomes[i] = UNPICKLABLE
                    self.values[i] = error_tuple(exc)
            blob = dumps(self.values)
        box.send((RESULTS, self.ids, self.outcomes, self.elapsed, blob, retiring))


def _run_one(task: Task, payload: Any) -> tuple[int, float, Any]:
    start = time.perf_counter()
    try:
        value = task.run(payload)
    except BaseException as exc:
        elapsed = time.perf_counter() - start
        return (ERROR if is_retryable(task, exc) else FATAL, elapsed, error_tuple(exc))
    return (OK, time.perf_counter() - start, value)


def _rss_probe():
    import psutil  # only workers with max_memory pay for the import

    memory_info = psutil.Process().memory_info
    return lambda: memory_info().rss


# -- one message as one call (backends without a pipe to the worker: Ray) -------------------------


class _Capture:
    """Stands in for the mailbox: keeps the message the local loop would have sent."""

    __slots__ = ("message",)

    def __init__(self) -> None:
        self.message: tuple | None = None

    def send(self, message: tuple) -> None:
        self.message = message


def run_message(
    tasks: list[Task],
    ids: list[int],
    stages: list[int],
    blob: bytes,
    retire: Any = None,
) -> tuple:
    """Run the jobs of one RUN message in order; return its one RESULTS message.

    The job semantics of the local loop, for backends that carry each message as a call:
    exceptions as plain data, retryable decided here against the real exception, a payload or
    value that cannot be pickled charged to its own job. ``retire()``, if given, is asked
    after each job why the worker leaves now (None: it stays); the jobs after it do not run.
    """
    box = _Capture()
    try:
        payloads = loads(blob)
    except BaseException as exc:
        _refuse_batch(box, ids, exc)  # type: ignore[arg-type]
        return box.message  # type: ignore[return-value]
    out = _Results()
    retiring = None
    for job_id, stage, payload in zip(ids, stages, payloads, strict=True):
        out.add(job_id, *_run_one(tasks[stage], payload))
        if retire is not None:
            retiring = retire()
            if retiring:
                break
    out.send(box, retiring)  # type: ignore[arg-type]
    return box.message  # type: ignore[return-value]
