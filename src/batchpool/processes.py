"""Process mechanics shared by local workers: the lifeline that outlives none of them, killing
a process tree, naming exit codes, a forkserver that survives group signals."""

from __future__ import annotations

import os
import signal
import threading
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


def describe_exit(code: int | None) -> str:
    """'exit code 13', 'SIGKILL (-9)'."""
    if code is None:
        return "exit status unknown"  # a worker whose platform does not report it (Ray)
    if code < 0:
        try:
            return f"{signal.Signals(-code).name} ({code})"
        except ValueError:
            return f"signal {-code} ({code})"
    return f"exit code {code}"


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant it started (a task's subprocesses included).

    SIGKILL, not SIGTERM: a hang inside C code ignores Python-level handlers, and a worker
    ignores SIGTERM anyway.
    """
    import psutil  # imported on first use: a pool starts ~25 ms sooner without it

    try:
        proc = psutil.Process(pid)
        victims = proc.children(recursive=True)
    except psutil.Error:
        victims = []
    for p in victims:
        try:
            p.kill()
        except psutil.Error:
            pass
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def start_forkserver_ignoring_signals() -> None:
    """Start the forkserver with SIGTERM and SIGINT ignored, for runs that own the signals.

    A terminal or service manager may signal the whole process group; a forkserver killed by
    that SIGTERM would make every worker look dead (its sentinel pipes close) while they still
    run. A signal ignored at exec stays ignored, so the server started here survives, and so
    do the workers it forks, leaving the drain to the supervisor. Main thread only.
    """
    from multiprocessing import forkserver

    if threading.current_thread() is not threading.main_thread():
        forkserver.ensure_running()
        return
    # SIGINT too: the server's children start with its disposition, and a worker between fork
    # and worker.main() must not die of a Ctrl-C meant for the supervisor.
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        forkserver.ensure_running()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
