"""Process mechanics shared by local workers: the lifeline that outlives none of them, killing
a process tree, naming exit codes, a forkserver that survives group signals and preloads what
every worker would import (preload.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection

_lifeline_lock = threading.Lock()
_lifeline: tuple[Connection, int] | None = None  # (read end for workers, write end we keep)


def _forget_lifeline_after_fork() -> None:
    """In any child forked from this process, drop the lifeline's write end: if a child kept a
    copy, workers could never see EOF when this process dies."""
    global _lifeline
    if _lifeline is not None:
        try:
            os.close(_lifeline[1])
        except OSError:
            pass
        _lifeline = None


os.register_at_fork(after_in_child=_forget_lifeline_after_fork)


def lifeline() -> Connection:
    """The read end of this process's lifeline pipe, shared by every worker of every pool."""
    global _lifeline
    with _lifeline_lock:
        if _lifeline is None:
            r, w = os.pipe()
            _lifeline = (Connection(r, writable=False), w)
        return _lifeline[0]


def describe_exit(code: int | None, detail: str | None = None) -> str:
    """'exit code 13', 'SIGKILL (-9)'; and ``detail``, what else the backend knows (a
    handle's ``exit_detail``: Ray's reason for an actor's death)."""
    if code is None:
        text = "exit status unknown"  # a worker whose platform does not report it (Ray)
    elif code < 0:
        try:
            text = f"{signal.Signals(-code).name} ({code})"
        except ValueError:
            text = f"signal {-code} ({code})"
    else:
        text = f"exit code {code}"
    return f"{text}; {detail}" if detail else text


def kill_tree(pid: int) -> None:
    """SIGKILL a worker and every process it started (a task's subprocesses included).

    SIGKILL, not SIGTERM: a hang inside C code ignores Python-level handlers, and a worker
    ignores SIGTERM anyway. A worker leads its own process group (worker.main), so one
    ``killpg`` takes the whole group at once, even a child forked a moment ago; descendants
    that left the group (setsid) are found through the process tree first.
    """
    import psutil  # imported on first use: a pool starts ~25 ms sooner without it

    try:
        victims = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        victims = []
    sweep_group(pid)
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for p in victims:
        try:
            p.kill()
        except psutil.Error:
            pass


def sweep_group(pid: int) -> None:
    """SIGKILL what is left of the process group a worker led: the processes its tasks started
    outlive it otherwise (they were reparented when it exited). Linux keeps a group's id from
    being reused as a pid while any member lives, so this reaches only the worker's own."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def watch_pid(pid: int) -> int | None:
    """A descriptor that becomes readable when the process ``pid`` exits (a pidfd), or None
    where the platform has none. It watches the process itself: a pipe-based sentinel stays
    open while any child of the worker holds an inherited copy (fork, spawn), and closes when
    the forkserver dies although the worker lives."""
    if sys.platform != "linux" or not hasattr(os, "pidfd_open"):
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


GROUP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def block_group_signals() -> None:
    """Block SIGINT, SIGTERM and SIGHUP in the calling thread (the supervisor's).

    The main thread still gets them (the kernel hands a process signal to a thread that does
    not block it), and every process this thread starts inherits the mask across fork and
    exec: a worker, or a forkserver started from here, cannot be killed by a Ctrl-C or a
    SIGTERM to the process group before it has set its own dispositions (worker.main), and
    no traceback is printed by a worker interrupted while it imports.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, GROUP_SIGNALS)


@contextlib.contextmanager
def group_signals_blocked() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP blocked in the calling thread meanwhile: what it starts
    inherits the mask (across fork and exec); the thread gets its own mask back after."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, GROUP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def start_forkserver_ignoring_signals(files: Sequence[tuple[str, str]] | None = None) -> None:
    """Start the forkserver, if it is not running, immune to signals sent to the group.

    A terminal or service manager may signal the whole process group; a forkserver killed by
    that SIGTERM takes down nothing (workers are watched by pid) but the next worker start
    would need a new server. Blocked signals survive exec and are inherited by every worker
    the server forks (which then ignores them, see worker.main). Any thread may call this: a
    forkserver that died is restarted from the supervisor's thread. ``files``: see _preloading.
    """
    from multiprocessing import forkserver, resource_tracker

    # The server needs the resource tracker, and starting the tracker unblocks SIGINT and
    # SIGTERM in the calling thread: start it first.
    resource_tracker.ensure_running()
    with group_signals_blocked(), _preloading(files):
        forkserver.ensure_running()


def start_forkserver_plainly(files: Sequence[tuple[str, str]] | None = None) -> None:
    """Start the forkserver, if it is not running, with no group signal blocked, whatever the
    calling thread blocks (the supervisor's blocks them): the server is shared with every pool
    of this process, multiprocessing's own included, and their workers inherit its mask."""
    from multiprocessing import forkserver

    previous = signal.pthread_sigmask(signal.SIG_UNBLOCK, GROUP_SIGNALS)
    try:
        with _preloading(files):
            forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _preloading(files: Sequence[tuple[str, str]] | None) -> contextlib.AbstractContextManager[None]:
    """With ``files`` (pipeline files, maybe none), the script and the files are named to a
    server started now (preload.py). That sets an environment variable, so only a pool's
    constructor passes them, in the caller's thread: a supervisor thread restarting a server
    must not write os.environ under a caller that may be reading it."""
    if files is None:
        return contextlib.nullcontext()
    from .preload import announced  # not at the top: the forkserver runs it on import

    return announced(files)
