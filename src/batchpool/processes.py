"""Starting and stopping worker processes; the lifeline that outlives none of them.

The supervisor talks to a worker only through a WorkerProcess handle (send, sentinel, kill), which
is the seam a cluster backend would replace.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from typing import Any

import psutil

from . import worker

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
        return "still running"
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


class WorkerProcess:
    """One worker: its process, its private duplex pipe, its progress slot."""

    __slots__ = ("slot", "proc", "conn", "sentinel", "pid")

    def __init__(
        self,
        ctx: BaseContext,
        slot: int,
        progress: Any,
        tasks_blob: bytes,
        preload: Sequence[tuple[str, str]],
        max_tasks: int | None,
        max_memory: int | None,
    ) -> None:
        self.slot = slot
        parent_end, child_end = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(
            target=worker.main,
            args=(
                child_end,
                lifeline(),
                progress,
                slot,
                tasks_blob,
                tuple(preload),
                max_tasks,
                max_memory,
            ),
            name=f"batchpool-worker-{slot}",
        )
        try:
            self.proc.start()
        finally:
            child_end.close()
        self.conn = parent_end
        self.sentinel = self.proc.sentinel
        self.pid: int = self.proc.pid  # type: ignore[assignment]

    def send(self, blob: bytes) -> bool:
        """False if the worker is gone (its sentinel will report the death)."""
        try:
            self.conn.send_bytes(blob)
            return True
        except OSError:
            return False

    def kill(self) -> None:
        kill_tree(self.pid)

    def reap(self) -> int | None:
        """Collect the exit status of a process whose sentinel fired."""
        self.proc.join(timeout=5)
        if self.proc.exitcode is None:  # sentinel fired but not dead yet: make sure
            self.kill()
            self.proc.join()
        code = self.proc.exitcode
        self.conn.close()
        self.proc.close()
        return code


def start_forkserver_ignoring_sigterm() -> None:
    """Start the forkserver with SIGTERM ignored, for runs that own the signals.

    A terminal or service manager may signal the whole process group; a forkserver killed by
    that SIGTERM would make every worker look dead (its sentinel pipes close) while they still
    run. A signal ignored at exec stays ignored, so the server started here survives, and so
    do the workers it forks, leaving the drain to the supervisor. Main thread only.
    """
    from multiprocessing import forkserver

    if threading.current_thread() is not threading.main_thread():
        forkserver.ensure_running()
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGTERM, previous)
